"""lookup_rows on a mesh equals jnp.take, rows and table gradient, in both of its regimes:
vocabulary-parallel (fewer tokens than table rows) and table gather (more tokens than rows),
with the vocabulary sharded over a batch axis and over an axis the batch does not use."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from meki_jax.model.layers import lookup_rows

VOCAB, WIDTH = 64, 3


@pytest.mark.parametrize('vocab_axes', [('fsdp', 'tensor'), ('tensor', 'fsdp')])
@pytest.mark.parametrize('batch,seq', [(4, 8), (4, 40), (8, 2)])  # 32, 160 (> VOCAB), 16 tokens
def test_sharded_lookup_equals_take(vocab_axes, batch, seq):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ('data', 'fsdp', 'tensor'))
  rules = [('batch', ('data', 'fsdp')), ('vocab', vocab_axes)]
  table = jnp.asarray(np.random.default_rng(0).normal(size=(VOCAB, WIDTH)), jnp.float32)
  ids = jnp.asarray(np.random.default_rng(batch * seq).integers(0, VOCAB, (batch, seq)),
                    jnp.int32)
  weights = jnp.arange(1.0, WIDTH + 1)
  loss = lambda lookup, t: jnp.sum(lookup(t, ids) * weights)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    rows = jax.jit(lookup_rows)(table, ids)
    grads = jax.jit(jax.grad(lambda t: loss(lookup_rows, t)))(table)
  np.testing.assert_array_equal(rows, jnp.take(table, ids, axis=0))
  expected = jax.grad(lambda t: loss(lambda t, i: jnp.take(t, i, axis=0), t))(table)
  np.testing.assert_allclose(grads, expected, rtol=1e-6)
