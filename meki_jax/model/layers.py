"""Building blocks with logical axis names: RMSNorm, bias-free dense layers and SwiGLU."""

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def normal_init(std, axes):
  """A normal(0, std) initializer whose parameter carries logical `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32; scale starts at 1.

  x: [..., features] -> [..., features] in `dtype`.
  """
  axis: str  # logical name of the normalised axis
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                       (x.shape[-1],), self.param_dtype)
    return rms_norm(x, scale, self.eps, self.dtype)


def rms_norm(x, scale, eps, dtype):
  """RMSNorm as a function of its scale: x [..., features], scale [features] -> x's shape."""
  x = x.astype(jnp.float32)
  normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return (normed * scale.astype(jnp.float32)).astype(dtype)


class Dense(nn.Module):
  """A bias-free linear map over the last axes of x: [..., *in] -> [..., *features].

  The kernel has shape [*in, *features] and logical axes `axes` (one name per kernel dim).
  """
  features: int | Sequence[int]
  axes: Sequence[str]
  in_axes: int = 1  # how many trailing axes of x are contracted
  std: float = 0.014
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param('kernel', normal_init(self.std, tuple(self.axes)),
                        in_shape + features, self.param_dtype)
    contract = tuple(range(x.ndim - self.in_axes, x.ndim))
    return jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((contract, tuple(range(self.in_axes))), ((), ())))


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): [..., d_in] -> [..., d_out] through `hidden` units.

  `in_axis`/`hidden_axis`/`out_axis` are logical names, so the same block serves the FFN
  (embed -> mlp -> embed) and the MeKi projection G (embed -> mlp -> mem). `out_std` (default
  `std`) initialises the down projection (Megatron's scaled init of output layers).
  """
  hidden: int
  out: int
  in_axis: str = 'embed'
  hidden_axis: str = 'mlp'
  out_axis: str = 'embed'
  std: float = 0.014
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  out_std: float | None = None

  @nn.compact
  def __call__(self, x):
    dense = lambda features, axes, name, std: Dense(features, axes, std=std, dtype=self.dtype,
                                                    param_dtype=self.param_dtype, name=name)
    gate = dense(self.hidden, (self.in_axis, self.hidden_axis), 'gate', self.std)(x)
    up = dense(self.hidden, (self.in_axis, self.hidden_axis), 'up', self.std)(x)  # [..., hidden]
    # Named so the 'mlp' remat policy can drop (and recompute) exactly these activations.
    hidden = checkpoint_name(nn.silu(gate), 'mlp_hidden') * checkpoint_name(up, 'mlp_hidden')
    out_std = self.std if self.out_std is None else self.out_std
    return dense(self.out, (self.hidden_axis, self.out_axis), 'down', out_std)(hidden)


def _mesh_axes(logical_name):
  """The mesh axes (a tuple) the active logical rules map `logical_name` to."""
  spec = nn.logical_to_mesh_axes((logical_name,))[0]
  return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def lookup_rows(table, token_ids):
  """table [vocab, width], token_ids [batch, seq] -> rows [batch, seq, width].

  When the active mesh shards the vocabulary, each device looks up only the ids that fall in
  its own slice of rows (others contribute zeros) and the partial rows are summed across the
  vocabulary shards with a reduce-scatter back onto the batch sharding (Megatron's
  vocab-parallel embedding). No device ever gathers the whole table, and the gradient is a
  local scatter-add into each device's own rows.
  """
  mesh = jax.sharding.get_abstract_mesh()
  vocab_axes = _mesh_axes('vocab') if not mesh.empty else ()
  vocab_axes = tuple(axis for axis in vocab_axes if mesh.shape[axis] > 1)
  if not vocab_axes:
    return jnp.take(table, token_ids, axis=0)
  batch_axes = _mesh_axes('batch')
  if token_ids.shape[0] % math.prod(mesh.shape[axis] for axis in batch_axes):
    batch_axes = ()  # e.g. init's 1-row batch: replicate the ids, sum the rows everywhere
  scatter_axes = tuple(axis for axis in vocab_axes if axis in batch_axes)
  sum_axes = tuple(axis for axis in vocab_axes if axis not in batch_axes)
  ids_axes = tuple(axis for axis in batch_axes if axis not in vocab_axes)

  def local_lookup(table_shard, ids):  # table_shard [vocab / shards, width]
    shard = 0
    for axis in vocab_axes:  # row-major index of this device's vocabulary slice
      shard = shard * mesh.shape[axis] + jax.lax.axis_index(axis)
    local_ids = ids - shard * table_shard.shape[0]
    mine = (local_ids >= 0) & (local_ids < table_shard.shape[0])
    rows = jnp.take(table_shard, jnp.where(mine, local_ids, 0), axis=0)
    rows = jnp.where(mine[..., None], rows, 0)  # [batch / ids shards, seq, width]
    if sum_axes:
      rows = jax.lax.psum(rows, sum_axes)
    if scatter_axes:
      rows = jax.lax.psum_scatter(rows, scatter_axes, scatter_dimension=0, tiled=True)
    return rows

  P = jax.sharding.PartitionSpec
  return jax.shard_map(local_lookup, mesh=mesh,
                       in_specs=(P(vocab_axes, None), P(ids_axes or None, None)),
                       out_specs=P(batch_axes or None, None, None), check_vma=False)(
                           table, token_ids)
