"""Grouped-query self-attention with RoPE, optional q/k RMSNorm, a document-aware causal mask
and a KV cache for decoding.

Training and evaluation attend with one of ATTENTION_IMPLEMENTATIONS (`config.model.attention`):
'xla' materialises the fp32 scores [batch, heads, seq, seq] (reference; short sequences),
'blocked' (blocked_attention.py) and 'splash' (splash.py, the Pallas TPU kernel) never do, and
'auto' takes splash on TPU (sequences and head_dim multiples of 128) and, elsewhere, blocked for
sequences of several `attention_block`s and xla for shorter ones. All four give the same
outputs and gradients (tests/model/test_attention_impl.py).

The cache of one layer is a pair (key, value), each [batch, kv_heads, cache_len, head_dim] holding
RoPE-rotated keys and values; a token's slot is its position, so row b's tokens occupy slots
0..length_b - 1 and rows of different lengths need no padding mask. Heads-major, a row's keys
for one kv head are contiguous, so a decode step reads the cache in one pass per product.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from meki_jax.model.blocked_attention import blocked_attention
from meki_jax.model.layers import Dense, RMSNorm
from meki_jax.model.rope import apply_rope
from meki_jax.model.splash import LANES, splash_attention

ATTENTION_IMPLEMENTATIONS = ('auto', 'xla', 'blocked', 'splash')


def document_causal_mask(segment_ids):
  """True where query t may attend to key s: s <= t and both in the same document.

  segment_ids: [batch, seq] (0 marks padding, which only attends to padding).
  Returns [batch, 1, 1, seq, seq] bool, broadcastable over (kv_heads, group).
  """
  seq = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_document = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, seq, seq]
  return (causal & same_document)[:, None, None]


def xla_attention(q, k, v, segment_ids):
  """q [batch, seq, kv_heads, group, head_dim], k/v [batch, seq, kv_heads, head_dim],
  segment_ids [batch, seq] -> [batch, seq, kv_heads, group, head_dim] via the whole fp32 score
  matrix [batch, kv_heads, group, seq, seq]."""
  scores = jnp.einsum('btkgh,bskh->bkgts', q, k,
                      preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
  scores = jnp.where(document_causal_mask(segment_ids), scores, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)  # [batch, kv, group, t, s]
  return jnp.einsum('bkgts,bskh->btkgh', weights, v)


def target_platform():
  """The platform the code is traced for: the active mesh's devices (a TPU topology in an
  ahead-of-time compile from a CPU host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def resolve_attention(name, seq, head_dim, block, platform):
  """The implementation `name` stands for at sequence length `seq` on `platform`."""
  if name != 'auto':
    return name
  if platform == 'tpu' and seq % LANES == 0 and head_dim % LANES == 0:
    return 'splash'
  return 'blocked' if seq > block and seq % block == 0 else 'xla'


def self_attention(name, q, k, v, segment_ids, block):
  """Document-causal attention with implementation `name` (ATTENTION_IMPLEMENTATIONS).

  Shapes as `xla_attention`. Splash off TPU runs in Pallas interpret mode. What the backward
  pass needs of the attention is named 'context' for the remat policies: the output of xla and
  blocked; the splash kernel names its own residuals (output and logsumexp, in its [batch,
  heads, seq, head_dim] layout), so its output, transposed back to q's layout, is left unnamed:
  named too, it was kept a second time (128 MiB per layer and device at 1.7B, 256 at 4B).
  """
  platform = target_platform()
  name = resolve_attention(name, q.shape[1], q.shape[-1], block, platform)
  if name == 'xla':
    return checkpoint_name(xla_attention(q, k, v, segment_ids), 'context')
  if name == 'blocked':
    return checkpoint_name(blocked_attention(q, k, v, segment_ids, block), 'context')
  if name == 'splash':
    return splash_attention(q, k, v, segment_ids, block, interpret=platform != 'tpu')
  raise ValueError(f'model.attention={name!r} is not one of {ATTENTION_IMPLEMENTATIONS}')


def cached_causal_mask(positions, cache_len):
  """True where the query at positions[b, t] may attend to cache slot s: s <= positions[b, t].

  positions: [batch, seq]. Returns [batch, 1, 1, seq, cache_len] bool. Slots beyond a query's
  position may hold stale or padding entries; they are masked, then overwritten in order.
  """
  return (jnp.arange(cache_len) <= positions[:, :, None])[:, None, None]


def init_kv_cache(batch, cache_len, num_kv_heads, head_dim, dtype):
  """One layer's empty cache: (key, value), each [batch, kv_heads, cache_len, head_dim]."""
  shape = (batch, num_kv_heads, cache_len, head_dim)
  return jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)


def _write_slots(cache, new, starts):
  """cache [batch, kv_heads, cache_len, head_dim] with new [batch, seq, kv_heads, head_dim]
  written at slots starts[b] .. starts[b] + seq - 1 of row b."""
  new = new.transpose(0, 2, 1, 3).astype(cache.dtype)  # [batch, kv_heads, seq, head_dim]
  return jax.vmap(lambda row, update, start: jax.lax.dynamic_update_slice_in_dim(
      row, update, start, axis=1))(cache, new, starts)


def _attend_cache(q, cache, positions, dtype):
  """q [batch, seq, kv_heads, group, head_dim] over the cache -> the same shape.

  A single query per row (a decode step) is a matrix-vector product over the cache, bound by
  reading it: written as multiply + reduce, XLA fuses each product into one pass over the cache,
  where its dot on CPU first transposes the cache (one token, 10K cache, 8 kv heads, 2 cores:
  11 ms against 77 ms with einsums). Longer chunks (a prefill) use einsums.
  """
  keys, values = cache  # [batch, kv_heads, cache_len, head_dim] each
  q = q.transpose(0, 2, 3, 1, 4)  # [batch, kv_heads, group, seq, head_dim]
  mask = cached_causal_mask(positions, keys.shape[2])  # [batch, 1, 1, seq, cache_len]
  f32 = jnp.float32
  if q.shape[3] == 1:
    scores = jnp.sum(q[:, :, :, :, None].astype(f32) * keys[:, :, None, None].astype(f32),
                     axis=-1)  # [batch, kv_heads, group, 1, cache_len]
  else:
    scores = jnp.einsum('bkgth,bksh->bkgts', q, keys, preferred_element_type=f32)
  scores = jnp.where(mask, scores * q.shape[-1] ** -0.5, jnp.finfo(f32).min)
  weights = jax.nn.softmax(scores, axis=-1).astype(dtype)  # [batch, kv, group, seq, cache_len]
  if q.shape[3] == 1:
    out = jnp.sum(weights[..., None].astype(f32) * values[:, :, None, None].astype(f32),
                  axis=-2).astype(dtype)  # [batch, kv_heads, group, 1, head_dim]
  else:
    out = jnp.einsum('bkgts,bksh->bkgth', weights, values)
  return out.transpose(0, 3, 1, 2, 4)


class Attention(nn.Module):
  """Qwen3 GQA: x [batch, seq, d_model] -> [batch, seq, d_model].

  With `cache` (one layer's (key, value), see `init_kv_cache`) the step's keys and values are
  written at the slots `positions` (contiguous per row), the queries attend over the whole
  cache, and the call returns (output, updated cache); `segment_ids` is then unused.
  Without a cache, `implementation` (ATTENTION_IMPLEMENTATIONS) attends, in blocks of
  `block` positions for 'blocked' and 'splash'. q/k/v after RoPE and the attention output are
  named 'query', 'key', 'value', 'context' for the remat policies (transformer.py).
  `out_std` (default `std`) initialises the output projection `o`.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  qk_norm: bool
  norm_eps: float
  std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype
  implementation: str = 'xla'
  block: int = 512
  out_std: float | None = None

  @nn.compact
  def __call__(self, x, positions, segment_ids, cache=None):
    kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense((self.num_heads, self.head_dim), ('embed', 'heads', 'head_dim'), name='q', **kw)(x)
    k = Dense((self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'head_dim'), name='k',
              **kw)(x)
    v = Dense((self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'head_dim'), name='v',
              **kw)(x)
    if self.qk_norm:  # per-head RMSNorm over head_dim, before RoPE (Qwen3)
      norm = dict(axis='head_dim', eps=self.norm_eps, dtype=self.dtype,
                  param_dtype=self.param_dtype)
      q = RMSNorm(name='q_norm', **norm)(q)
      k = RMSNorm(name='k_norm', **norm)(k)
    q = apply_rope(q, positions, self.rope_theta)  # [batch, seq, heads, head_dim]
    k = apply_rope(k, positions, self.rope_theta)  # [batch, seq, kv_heads, head_dim]
    q = checkpoint_name(nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim')),
                        'query')
    k = checkpoint_name(nn.with_logical_constraint(k, ('batch', 'length', 'kv_heads',
                                                       'head_dim')), 'key')
    v = checkpoint_name(nn.with_logical_constraint(v, ('batch', 'length', 'kv_heads',
                                                       'head_dim')), 'value')

    batch, seq = x.shape[:2]
    group = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, seq, self.num_kv_heads, group, self.head_dim)
    if cache is None:
      # Parameters do not depend on the implementation: init traces the reference.
      name = 'xla' if self.is_initializing() else self.implementation
      out = self_attention(name, q, k, v, segment_ids, self.block)
    else:
      cache = (_write_slots(cache[0], k, positions[:, 0]),
               _write_slots(cache[1], v, positions[:, 0]))
      out = _attend_cache(q, cache, positions, self.dtype)
    out = out.reshape(batch, seq, self.num_heads, self.head_dim)
    out_kw = dict(kw, std=self.std if self.out_std is None else self.out_std)
    out = Dense(x.shape[-1], ('heads', 'head_dim', 'embed'), in_axes=2, name='o', **out_kw)(out)
    return out if cache is None else (out, cache)
