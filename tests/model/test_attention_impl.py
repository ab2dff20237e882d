"""The blocked and splash attentions equal the XLA reference, outputs and gradients, on packed
rows of several documents (splash in Pallas interpret mode on CPU), alone, in the whole model,
and sharded over a mesh."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from meki_jax import sharding
from meki_jax.model.attention import resolve_attention, self_attention, xla_attention
from meki_jax.model.transformer import build_model

RTOL = 1e-5  # fp32, relative to the largest magnitude


def _packed_inputs(batch=2, seq=256, kv_heads=2, group=2, head_dim=128, seed=0):
  """q, k, v and segment ids of rows packing 3-4 documents, one row ending in padding (id 0)."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, group, head_dim)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(batch, seq, kv_heads, head_dim)), jnp.float32)
  segments = np.ones((batch, seq), np.int32)
  segments[0, 50:], segments[0, 130:], segments[0, 131:] = 2, 3, 4  # a 1-token document
  segments[1, 200:], segments[1, 250:] = 2, 0
  return q, k, v, jnp.asarray(segments)


def _assert_close(actual, expected):
  scale = float(jnp.max(jnp.abs(expected)))
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=RTOL * scale, rtol=0)


@pytest.mark.parametrize('name,block', [('blocked', 64), ('blocked', 256), ('splash', 128)])
def test_attention_equals_xla_outputs_and_gradients(name, block):
  q, k, v, segments = _packed_inputs()
  weights = jnp.sin(jnp.arange(q.shape[-1], dtype=jnp.float32))  # a loss that mixes dims

  def loss(attend, q, k, v):
    return jnp.sum(attend(q, k, v, segments) * weights)

  attend = functools.partial(self_attention, name, block=block)
  _assert_close(jax.jit(attend)(q, k, v, segments), xla_attention(q, k, v, segments))
  grads = jax.jit(jax.grad(functools.partial(loss, attend), argnums=(0, 1, 2)))(q, k, v)
  reference = jax.grad(functools.partial(loss, xla_attention), argnums=(0, 1, 2))(q, k, v)
  for actual, expected in zip(grads, reference):
    _assert_close(actual, expected)


def test_auto_is_splash_on_tpu_and_blocked_for_long_sequences_elsewhere():
  assert resolve_attention('auto', 4096, 128, 512, 'tpu') == 'splash'
  assert resolve_attention('auto', 4096, 128, 512, 'cpu') == 'blocked'
  assert resolve_attention('auto', 512, 128, 512, 'gpu') == 'xla'
  assert resolve_attention('blocked', 128, 128, 512, 'tpu') == 'blocked'
  assert resolve_attention('auto', 100, 128, 512, 'tpu') == 'xla'  # not a multiple of 128 lanes
  assert resolve_attention('auto', 128, 24, 512, 'tpu') == 'xla'  # head_dim either
  assert resolve_attention('auto', 1000, 128, 512, 'cpu') == 'xla'  # not a multiple of the block


def test_blocks_that_do_not_tile_the_sequence_are_refused():
  q, k, v, segments = _packed_inputs(seq=96)
  with pytest.raises(ValueError, match='sequence length 96 is not a multiple of the block size 64'):
    self_attention('blocked', q, k, v, segments, 64)
  with pytest.raises(ValueError, match='= 96 must be a multiple of 128'):
    self_attention('splash', q, k, v, segments, 512)


def _model_loss(config, params, tokens, positions, segments):
  logits = build_model(config).apply({'params': params}, tokens, positions, segments)
  return jnp.mean(jax.nn.log_softmax(logits)[..., 0])


@pytest.mark.slow
@pytest.mark.parametrize('name', ['blocked', 'splash'])
def test_model_logits_and_gradients_equal_xla_sharded(tiny_model_config, name):
  """The whole MeKi model on a (fsdp 4 x tensor 2) mesh: the loss and parameter gradients of a
  packed batch equal the single-device XLA attention's."""
  config = tiny_model_config(vocab_size=128, head_dim=128, attention_block=128)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (4, 256), 0, config.vocab_size)
  lengths = (100, 120, 36)
  segments = jnp.asarray(np.repeat([np.repeat([1, 2, 3], lengths)], 4, axis=0))
  positions = jnp.asarray(np.repeat([np.concatenate([np.arange(n) for n in lengths])], 4, 0))
  params = build_model(config).init(jax.random.PRNGKey(0), tokens)['params']
  params = nn.meta.unbox(params)
  reference_config = ml_collections.ConfigDict(config.to_dict())
  reference_config.attention = 'xla'
  reference = jax.value_and_grad(functools.partial(_model_loss, reference_config))(
      params, tokens, positions, segments)

  mesh_config = base.get_config().mesh
  mesh_config.shape = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2))
  mesh, rules = sharding.make_mesh(mesh_config, jax.devices()), sharding.axis_rules(mesh_config)
  config.attention = name
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    loss, grads = jax.jit(jax.value_and_grad(functools.partial(_model_loss, config)))(
        params, tokens, positions, segments)
  np.testing.assert_allclose(float(loss), float(reference[0]), rtol=RTOL)
  for actual, expected in zip(jax.tree_util.tree_leaves(grads),
                              jax.tree_util.tree_leaves(reference[1])):
    _assert_close(actual, expected)
