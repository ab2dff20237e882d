"""Building blocks with logical axis names: RMSNorm, bias-free dense layers and SwiGLU."""

import functools
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp


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


def _project(x, kernel, in_axes):
  """x [..., *in] @ kernel [*in, *out] -> [..., *out], contracting the last `in_axes` of x."""
  contract = tuple(range(x.ndim - in_axes, x.ndim))
  return jax.lax.dot_general(x, kernel, ((contract, tuple(range(in_axes))), ((), ())))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def project_weight_grad_first(x, kernel, in_axes):
  """x [..., *in] @ kernel [*in, *out] -> [..., *out]: `_project`'s values and gradients.

  The backward pass returns x's gradient and the kernel's through one optimization barrier, so
  neither is usable before both exist. Without it XLA defers a kernel gradient (a matmul and, for
  a sharded kernel, a reduce-scatter) past the rest of the layer's backward pass and keeps what
  it reads, the layer's input and output cotangent, alive through the attention backward. Set on
  the FFN's gate and up and on MeKi's output projection (`config.model.weight_grad_first`), it
  lowered meki_1p7b's `mlp` step at the recipe's shape from 25.57 to 24.80 GiB per device and
  left dense_1p7b's at 24.28 (on q/k/v it raised dense's). On the FFN's down projection it
  raises dense's (dense_4b 28.91 -> 29.72 GiB) and meki's under 'full' (meki_1p7b 8.19 ->
  8.26) and lowers meki_4b's under 'mlp' (30.43 -> 30.02), so it is set there only with a MeKi
  branch parallel to the FFN and a policy that keeps the attention.
  """
  return _project(x, kernel, in_axes)


def _project_fwd(x, kernel, in_axes):
  return _project(x, kernel, in_axes), (x, kernel)


def _project_bwd(in_axes, residuals, out_grad):
  """out_grad [..., *out] -> (x grad [..., *in], kernel grad [*in, *out])."""
  x, kernel = residuals
  out_axes = kernel.ndim - in_axes
  grad_out = tuple(range(out_grad.ndim - out_axes, out_grad.ndim))
  x_grad = jax.lax.dot_general(out_grad, kernel,
                               ((grad_out, tuple(range(in_axes, kernel.ndim))), ((), ())))
  batch = tuple(range(x.ndim - in_axes))
  kernel_grad = jax.lax.dot_general(x, out_grad, ((batch, batch), ((), ())))
  return jax.lax.optimization_barrier((x_grad, kernel_grad))


project_weight_grad_first.defvjp(_project_fwd, _project_bwd)


class Dense(nn.Module):
  """A bias-free linear map over the last axes of x: [..., *in] -> [..., *features].

  The kernel has shape [*in, *features] and logical axes `axes` (one name per kernel dim).
  `weight_grad_first`: the backward pass computes the kernel's gradient together with x's
  (`project_weight_grad_first`).
  """
  features: int | Sequence[int]
  axes: Sequence[str]
  in_axes: int = 1  # how many trailing axes of x are contracted
  std: float = 0.014
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32
  weight_grad_first: bool = False

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param('kernel', normal_init(self.std, tuple(self.axes)),
                        in_shape + features, self.param_dtype)
    project = project_weight_grad_first if self.weight_grad_first else _project
    return project(x.astype(self.dtype), kernel.astype(self.dtype), self.in_axes)


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
  weight_grad_first: Sequence[str] = ()  # of 'gate', 'up', 'down': see Dense

  @nn.compact
  def __call__(self, x):
    dense = lambda features, axes, name, std: Dense(
        features, axes, std=std, dtype=self.dtype, param_dtype=self.param_dtype, name=name,
        weight_grad_first=name in self.weight_grad_first)
    gate = dense(self.hidden, (self.in_axis, self.hidden_axis), 'gate', self.std)(x)
    up = dense(self.hidden, (self.in_axis, self.hidden_axis), 'up', self.std)(x)  # [..., hidden]
    hidden = nn.silu(gate) * up  # not named: the 'mlp' remat policy recomputes it
    out_std = self.std if self.out_std is None else self.out_std
    return dense(self.out, (self.hidden_axis, self.out_axis), 'down', out_std)(hidden)


def mesh_axes(logical_name):
  """The mesh axes (a tuple) the active logical rules map `logical_name` to."""
  spec = nn.logical_to_mesh_axes((logical_name,))[0]
  return () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))


def lookup_rows(table, token_ids, dtype=None):
  """table [vocab, width], token_ids [batch, seq] -> rows [batch, seq, width] in `dtype`
  (default: the table's). Rows are read in the table's dtype and cast before they move, so
  the table's gradient is accumulated in its own dtype from the cotangent in `dtype`.

  When the active mesh shards the vocabulary, the vocabulary axes that also shard the batch
  are handled one of three ways, whichever moves less data:
  - fewer tokens than table rows (small batches): each device looks up only the ids that fall
    in its own slice of rows (others contribute zeros) and the partial rows are summed and
    reduce-scattered back onto the batch sharding (Megatron's vocab-parallel embedding); no
    device holds the whole table, but every device holds the whole batch's rows for a moment.
  - more tokens than rows, fewer per device than rows, and a width those axes divide (the
    recipe: 32,768 tokens per chip on v5p-64, 151,680 rows of 2,048): an all-to-all turns each
    device's slice of rows into a slice of columns of every row, each device looks up its
    column slice for the ids of all devices along those axes and a second all-to-all hands
    each device its own tokens' full rows; the gradient takes the same way back. No device
    holds more than a column slice of the table or its gradient (MaxText shards the table's
    columns over fsdp to the same end).
  - otherwise: each device all-gathers the table's slices over those axes (the table sharded
    only over the remaining vocabulary axes, for the duration of the lookup) and looks up its
    own rows of the batch; the gradient is the whole table's on every device until it is
    reduce-scattered back onto the table's sharding. Holding [global batch, seq, width] rows
    would cost, at 256 x 4096 tokens and d_model 2048 in fp32, 8 GiB per device.
  Vocabulary axes that do not shard the batch stay vocabulary-parallel (partial rows summed).
  """
  mesh = jax.sharding.get_abstract_mesh()
  vocab_axes = mesh_axes('vocab') if not mesh.empty else ()
  vocab_axes = tuple(axis for axis in vocab_axes if mesh.shape[axis] > 1)
  dtype = table.dtype if dtype is None else jnp.dtype(dtype)
  if not vocab_axes:
    return jnp.take(table, token_ids, axis=0).astype(dtype)
  batch_axes = mesh_axes('batch')
  if token_ids.shape[0] % math.prod(mesh.shape[axis] for axis in batch_axes):
    batch_axes = ()  # e.g. init's 1-row batch: replicate the ids, sum the rows everywhere
  shared_axes = tuple(axis for axis in vocab_axes if axis in batch_axes)
  shared_shards = math.prod(mesh.shape[axis] for axis in shared_axes)
  gather = token_ids.size > table.shape[0]
  tokens_per_shard = token_ids.size // math.prod(mesh.shape[axis] for axis in batch_axes)
  columns = (gather and bool(shared_axes) and table.shape[1] % shared_shards == 0
             and tokens_per_shard < table.shape[0])
  gather_axes = shared_axes if gather else ()
  scatter_axes = () if gather else shared_axes
  sum_axes = tuple(axis for axis in vocab_axes if axis not in batch_axes)
  ids_axes = tuple(axis for axis in batch_axes if gather or axis not in vocab_axes)

  def local_lookup(table_shard, ids):  # table_shard [vocab / shards, width]
    rows_per_shard = table_shard.shape[0]
    if columns:  # the ids of all shared shards
      ids = jax.lax.all_gather(ids, gather_axes, axis=0, tiled=True)
    elif gather_axes:  # [vocab / sum-axes shards, width], blocks row-major over gather_axes
      table_shard = jax.lax.all_gather(table_shard, gather_axes, axis=0, tiled=True)
    # Decompose each id's vocabulary shard into its index along every vocabulary axis
    # (row-major over vocab_axes): the id is here if it matches this device's index along the
    # axes not gathered; its block in the local table is its index over the gathered axes.
    shard, mine, block = ids // rows_per_shard, True, 0
    for axis in reversed(vocab_axes):
      index, shard = shard % mesh.shape[axis], shard // mesh.shape[axis]
      if axis not in gather_axes:
        mine = mine & (index == jax.lax.axis_index(axis))
    stride = 1
    for axis in reversed(gather_axes):
      block = block + (ids // rows_per_shard // _minor_size(axis, vocab_axes, mesh)
                       % mesh.shape[axis]) * stride
      stride *= mesh.shape[axis]
    mine = mine & (shard == 0)  # ids beyond the table
    local_ids = block * rows_per_shard + ids % rows_per_shard
    if columns:  # [batch / ids shards * shared shards, seq, width / shared shards]
      rows = _column_lookup(gather_axes, dtype, table_shard, mine, local_ids)
    else:
      rows = _read_rows(table_shard, mine, local_ids)  # [batch / ids shards, seq, width]
    if sum_axes:
      rows = jax.lax.psum(rows, sum_axes)
    if scatter_axes:
      rows = jax.lax.psum_scatter(rows, scatter_axes, scatter_dimension=0, tiled=True)
    rows = rows.astype(dtype)
    if columns:  # [batch / ids shards * shared shards, seq, width / shared shards] -> own rows
      rows = jax.lax.all_to_all(rows, gather_axes, 0, 2, tiled=True)
    return rows

  P = jax.sharding.PartitionSpec
  return jax.shard_map(local_lookup, mesh=mesh,
                       in_specs=(P(vocab_axes, None), P(ids_axes or None, None)),
                       out_specs=P(batch_axes or None, None, None), check_vma=False)(
                           table, token_ids)


def _read_rows(table, mine, local_ids):
  """table [rows, width], mine and local_ids [batch', seq] -> [batch', seq, width]: the rows
  local_ids where mine, zeros elsewhere (read from an index past the table, filled with zeros
  and dropped by the gradient, so the backward pass keeps no [batch', seq, width] mask)."""
  beyond = table.shape[0]
  return jnp.take(table, jnp.where(mine, local_ids, beyond), axis=0, mode='fill', fill_value=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _column_lookup(axes, dtype, table_shard, mine, local_ids):
  """Inside a shard_map over `axes` (S devices): table_shard [rows, width], mine and local_ids
  [S * batch', seq] (the ids of all S devices, indexing their row slices stacked in device
  order) -> [S * batch', seq, width / S], this device's column slice of those rows, in the
  table's dtype.

  An all-to-all turns the row slices into column slices in `dtype` (the rows are cast to it
  anyway): in the table's fp32, a TPU lays the parameter out column-major for the all-to-all
  (64 columns would fill half of 128 lanes) and keeps that 37 MiB copy to the optimizer update
  (the recipe's 1.7B on v5p-64). Rows are read for one device's ids at a time, so the
  gradient's scatter-add takes one device's tokens at a time (a TPU lays a [tokens, 32] fp32
  update out 128 lanes wide: 512 MiB for the recipe's 1M tokens at once on v6e-64, 8 MiB for
  one device's); the gradient is accumulated in the table's dtype, as jnp.take's.
  """
  columns = jax.lax.all_to_all(table_shard.astype(dtype), axes, 1, 0, tiled=True)
  split = _split_devices(columns.shape[0] // table_shard.shape[0])
  rows = jax.lax.map(lambda args: _read_rows(columns, *args), (split(mine), split(local_ids)))
  return rows.reshape((-1,) + rows.shape[2:]).astype(table_shard.dtype)


def _column_lookup_fwd(axes, dtype, table_shard, mine, local_ids):
  rows = _column_lookup(axes, dtype, table_shard, mine, local_ids)
  return rows, (table_shard, mine, local_ids)  # the table for its shape: a parameter, no copy


def _column_lookup_bwd(axes, dtype, residuals, rows_grad):
  table_shard, mine, local_ids = residuals
  shards = table_shard.shape[1] // rows_grad.shape[-1]
  split = _split_devices(shards)

  def add(grad, device):  # one device's tokens: [batch', seq] ids, [batch', seq, width / S]
    mine, local_ids, rows_grad = device
    beyond = grad.shape[0]
    return grad.at[jnp.where(mine, local_ids, beyond)].add(rows_grad, mode='drop'), None

  grad = jnp.zeros((shards * table_shard.shape[0], rows_grad.shape[-1]), table_shard.dtype)
  grad, _ = jax.lax.scan(add, grad, (split(mine), split(local_ids), split(rows_grad)))
  return jax.lax.all_to_all(grad, axes, 0, 1, tiled=True), None, None


_column_lookup.defvjp(_column_lookup_fwd, _column_lookup_bwd)


def _split_devices(shards):
  """[shards * n, ...] -> [shards, n, ...]."""
  return lambda x: x.reshape((shards, -1) + x.shape[1:])


def _minor_size(axis, vocab_axes, mesh):
  """Product of the sizes of the vocabulary axes after `axis` (its stride in shard indices)."""
  return math.prod(mesh.shape[minor] for minor in vocab_axes[vocab_axes.index(axis) + 1:])
