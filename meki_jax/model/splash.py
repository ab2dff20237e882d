"""The Pallas TPU splash-attention kernel with a document-causal mask and GQA.

`jax.experimental.pallas.ops.tpu.splash_attention` computes attention block by block on the
TPU's cores (forward and backward kernels), skipping blocks the causal mask hides, and keeps
only the output and the per-row logsumexp for the backward pass. Documents packed in one row are
separated with segment ids. Off TPU the same kernel runs in Pallas interpret mode (tests).

A Pallas call is opaque to XLA's SPMD partitioner, so under a mesh the kernel runs inside
`shard_map` over the batch and head axes the logical rules give (each device attends over its
own rows and heads; the sequence is never split).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as splash

from meki_jax.model.layers import mesh_axes

P = jax.sharding.PartitionSpec
LANES = 128  # the kernel's blocks are multiples of the TPU's vector lanes


def _kernel(num_heads, seq, block, interpret):
  """The splash kernel for [num_heads, seq, head_dim] queries under a causal mask."""
  mask = splash.MultiHeadMask([splash.CausalMask((seq, seq))] * num_heads)
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                residual_checkpoint_name='context', interpret=interpret)


def _local_attention(q, k, v, segment_ids, block, interpret):
  """q [batch, heads, seq, head_dim] (scaled), k/v [batch, kv_heads, seq, head_dim] -> q's."""
  kernel = _kernel(q.shape[1], q.shape[2], block, interpret)
  attend = lambda q, k, v, ids: kernel(q, k, v, splash.SegmentIds(q=ids, kv=ids))
  return jax.vmap(attend)(q, k, v, segment_ids)


def _divisible_axes(axes, size, mesh):
  """`axes` if their product divides `size`, else () (that dimension stays unsharded)."""
  shards = 1
  for axis in axes:
    shards *= mesh.shape[axis]
  return axes if size % shards == 0 else ()


def splash_attention(q, k, v, segment_ids, block, interpret=False):
  """Document-causal GQA with the splash kernel.

  q [batch, seq, kv_heads, group, head_dim]; k, v [batch, seq, kv_heads, head_dim];
  segment_ids [batch, seq]. min(block, seq) must be a multiple of 128 dividing seq. Returns q's shape and dtype.
  Query head kv * group + g uses kv head kv, as in the XLA attention.
  """
  batch, seq, kv_heads, group, head_dim = q.shape
  block = min(block, seq)
  if block % LANES or seq % block:
    raise ValueError(f'splash attention: the block size min(model.attention_block, sequence '
                     f'length {seq}) = {block} must be a multiple of {LANES} and divide the '
                     'sequence length')
  q = (q * head_dim ** -0.5).astype(q.dtype)
  q = q.reshape(batch, seq, kv_heads * group, head_dim).transpose(0, 2, 1, 3)
  k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [batch, kv_heads, seq, head_dim]
  segment_ids = segment_ids.astype(jnp.int32)
  attend = functools.partial(_local_attention, block=block, interpret=interpret)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    batch_axes = _divisible_axes(mesh_axes('batch'), batch, mesh)
    head_axes = _divisible_axes(mesh_axes('kv_heads'), kv_heads, mesh)
    heads, rows = P(batch_axes or None, head_axes or None, None, None), P(batch_axes or None)
    attend = jax.shard_map(attend, mesh=mesh, in_specs=(heads, heads, heads, rows),
                           out_specs=heads, check_vma=False)
  out = attend(q, k, v, segment_ids)  # [batch, heads, seq, head_dim]
  return out.transpose(0, 2, 1, 3).reshape(batch, seq, kv_heads, group, head_dim)
