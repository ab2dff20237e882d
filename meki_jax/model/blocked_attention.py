"""Memory-efficient attention for CPU/GPU: blocked, online softmax, document-causal mask.

The sequence is cut into query blocks of `block` positions. Query block i attends to key blocks
0..i only (later blocks are entirely in its future), one key block at a time with the running
max / running sum of the online softmax, so no [seq, seq] score matrix ever exists: the forward
holds [block, block] scores per (kv head, group), and each query block runs under
`jax.checkpoint`, so its backward recomputes those scores instead of keeping them (at most
block x seq of them at once, one query block at a time).
"""

import jax
import jax.numpy as jnp


def _query_block(q, keys, values, q_segments, kv_segments, q_positions, kv_positions):
  """One query block against its key blocks.

  q [batch, block, kv_heads, group, head_dim] (already scaled); keys/values
  [n, batch, block, kv_heads, head_dim]; q_segments [batch, block]; kv_segments [n, batch, block];
  q_positions [block]; kv_positions [n, block]. Returns [batch, block, kv_heads, group, head_dim]
  in float32.
  """
  f32 = jnp.float32
  batch, block, kv_heads, group, head_dim = q.shape
  stats_shape = (batch, kv_heads, group, block)

  def step(carry, xs):
    running_max, running_sum, acc = carry
    k, v, kv_segment, kv_position = xs
    scores = jnp.einsum('btkgh,bskh->bkgts', q, k, preferred_element_type=f32)
    visible = ((q_positions[:, None] >= kv_position[None, :])[None]
               & (q_segments[:, :, None] == kv_segment[:, None, :]))[:, None, None]
    scores = jnp.where(visible, scores, jnp.finfo(f32).min)
    new_max = jnp.maximum(running_max, jnp.max(scores, axis=-1))
    probs = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0.0)
    correction = jnp.exp(running_max - new_max)
    running_sum = running_sum * correction + jnp.sum(probs, axis=-1)
    acc = acc * correction[..., None] + jnp.einsum(
        'bkgts,bskh->bkgth', probs.astype(v.dtype), v, preferred_element_type=f32)
    return (new_max, running_sum, acc), None

  init = (jnp.full(stats_shape, jnp.finfo(f32).min, f32), jnp.zeros(stats_shape, f32),
          jnp.zeros(stats_shape + (head_dim,), f32))
  (_, running_sum, acc), _ = jax.lax.scan(step, init,
                                          (keys, values, kv_segments, kv_positions))
  out = acc / running_sum[..., None]  # the diagonal is always visible: running_sum > 0
  return out.transpose(0, 3, 1, 2, 4)


def blocked_attention(q, k, v, segment_ids, block):
  """Document-causal attention without a [seq, seq] matrix.

  q [batch, seq, kv_heads, group, head_dim]; k, v [batch, seq, kv_heads, head_dim];
  segment_ids [batch, seq] (a query sees keys at or before it with the same id). `block` must
  divide seq. Returns [batch, seq, kv_heads, group, head_dim] in q's dtype.
  """
  batch, seq = q.shape[:2]
  if seq % block:
    raise ValueError(f'blocked attention: sequence length {seq} is not a multiple of the '
                     f'block size {block} (model.attention_block)')
  num_blocks = seq // block
  q = (q * q.shape[-1] ** -0.5).astype(q.dtype)
  split = lambda x: jnp.moveaxis(x.reshape((batch, num_blocks, block) + x.shape[2:]), 1, 0)
  keys, values, kv_segments = split(k), split(v), split(segment_ids)
  positions = jnp.arange(seq).reshape(num_blocks, block)
  query_block = jax.checkpoint(_query_block)
  outputs = []
  for i in range(num_blocks):  # static: block i scans key blocks 0..i
    rows = slice(i * block, (i + 1) * block)
    outputs.append(query_block(q[:, rows], keys[:i + 1], values[:i + 1],
                               segment_ids[:, rows], kv_segments[:i + 1], positions[i],
                               positions[:i + 1]))
  return jnp.concatenate(outputs, axis=1).astype(q.dtype)
