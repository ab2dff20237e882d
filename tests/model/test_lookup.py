"""lookup_rows on a mesh equals jnp.take, rows and table gradient, in its three regimes:
vocabulary-parallel (fewer tokens than table rows), column slices (more tokens than rows, fewer
per device, a width the batch's vocabulary shards divide) and table gather (the rest), with the
vocabulary sharded over a batch axis and over an axis the batch does not use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from meki_jax.model.layers import lookup_rows

VOCAB = 64


def _check_lookup(mesh, rules, batch, seq, width, dtype=jnp.float32):
  """Rows (in `dtype`) and fp32 table gradient of lookup_rows equal those of jnp.take and a
  cast; returns the gradient's HLO."""
  table = jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, width)), jnp.float32)
  ids = jnp.asarray(np.random.default_rng(batch * seq).integers(0, VOCAB, (batch, seq)),
                    jnp.int32)
  # a cotangent per token: a gradient accumulated in bf16 would differ from fp32's
  weights = jnp.asarray(np.random.default_rng(1).normal(size=(batch, seq, width)), jnp.float32)
  loss = lambda lookup, t: jnp.sum(lookup(t, ids).astype(jnp.float32) * weights)
  take = lambda t, i: jnp.take(t, i, axis=0).astype(dtype)
  sharded_lookup = lambda t, i: lookup_rows(t, i, dtype)
  grad = jax.jit(jax.grad(lambda t: loss(sharded_lookup, t)))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    rows = jax.jit(sharded_lookup)(table, ids)
    grads = grad(table)
    hlo = grad.lower(table).as_text()
  assert rows.dtype == dtype
  np.testing.assert_array_equal(rows, take(table, ids))
  expected = jax.grad(lambda t: loss(take, t))(table)
  np.testing.assert_allclose(grads, expected, rtol=1e-6, atol=1e-6)  # fp32 sum orders
  return hlo


@pytest.mark.parametrize('vocab_axes', [('fsdp', 'tensor'), ('tensor', 'fsdp')])
@pytest.mark.parametrize('batch,seq,width,regime', [
    (4, 8, 3, 'vocab_parallel'), (8, 2, 3, 'vocab_parallel'),  # 32 and 16 tokens
    (4, 40, 3, 'gather'),  # 160 tokens, 40 per device: 4 fsdp shards do not divide the width
    (4, 40, 8, 'columns'),  # the same tokens, width 8
    (4, 80, 8, 'gather')])  # 80 tokens per device (> VOCAB)
def test_sharded_lookup_equals_take(vocab_axes, batch, seq, width, regime):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ('data', 'fsdp', 'tensor'))
  rules = [('batch', ('data', 'fsdp')), ('vocab', vocab_axes)]
  hlo = _check_lookup(mesh, rules, batch, seq, width)
  assert ('all_to_all' in hlo) == (regime == 'columns')
  assert ('reduce_scatter' in hlo) == (regime == 'gather')  # the gathered table's gradient


def test_column_slices_over_two_batch_axes_between_a_vocabulary_parallel_one():
  """The vocabulary over (tensor, data, fsdp), the batch over (data, fsdp): the column
  slices run over data and fsdp together, tensor's partial rows are summed."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 2, 2), ('data', 'fsdp', 'tensor'))
  rules = [('batch', ('data', 'fsdp')), ('vocab', ('tensor', 'data', 'fsdp'))]
  assert 'all_to_all' in _check_lookup(mesh, rules, 4, 40, 8)


def test_column_slices_move_rows_in_the_compute_dtype():
  """bf16 rows from an fp32 table: the rows cross the all-to-all in bf16, the gradient equals
  the fp32 take-and-cast's."""
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ('data', 'fsdp', 'tensor'))
  rules = [('batch', ('data', 'fsdp')), ('vocab', ('fsdp', 'tensor'))]
  hlo = _check_lookup(mesh, rules, 4, 40, 8, jnp.bfloat16)
  assert any('all_to_all' in line and 'bf16' in line for line in hlo.splitlines())
