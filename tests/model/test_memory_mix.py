"""MeKi's equations (1)-(3) per token and per vocabulary row give the same model: logits and
every parameter gradient (fp32), for both memories (the static and dynamic paths together), G
alone in the authors_release flavor, and on a sharded mesh."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from meki_jax.model.meki import resolve_memory_mix
from meki_jax.model.transformer import build_model

BATCH, SEQ = 4, 40  # 160 tokens against a vocabulary of 97


def _logits_and_grads(config, memory_mix, params, tokens):
  model = build_model(dict(config, memory_mix=memory_mix))

  def loss(p):
    logits = model.apply({'params': p}, tokens)
    return jnp.sum(logits ** 2) / tokens.size, logits

  (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return logits, grads


def _assert_same_model(config, params, tokens):
  logits, grads = _logits_and_grads(config, 'tokens', params, tokens)
  logits_v, grads_v = _logits_and_grads(config, 'vocabulary', params, tokens)
  np.testing.assert_allclose(logits_v, logits, rtol=1e-5, atol=1e-6)
  for (path, grad), grad_v in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree_util.tree_leaves(grads_v)):
    scale = float(jnp.max(jnp.abs(grad))) or 1.0
    np.testing.assert_allclose(grad_v / scale, grad / scale, atol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def _model_and_data(tiny_model_config, **overrides):
  config = tiny_model_config(**overrides)
  tokens = jnp.asarray(np.random.default_rng(1).integers(0, config.vocab_size, (BATCH, SEQ)),
                       jnp.int32)
  params = jax.jit(build_model(config).init)(jax.random.PRNGKey(0), tokens)['params']
  return config, nn.meta.unbox(params), tokens


@pytest.mark.parametrize('memory,flavor', [
    ('both', 'paper'), pytest.param('dynamic', 'authors_release', marks=pytest.mark.slow)])
def test_vocabulary_mix_equals_token_mix(tiny_model_config, memory, flavor):
  overrides = dict(flavor=flavor, meki=dict(memory=memory))
  if flavor == 'authors_release':
    overrides['qk_norm'] = False
  config, params, tokens = _model_and_data(tiny_model_config, **overrides)
  _assert_same_model(config, params, tokens)


@pytest.mark.slow
def test_vocabulary_mix_equals_token_mix_on_a_mesh(tiny_model_config):
  """Tables, embedding and batch sharded as in the recipe (vocab over fsdp x tensor)."""
  config, params, tokens = _model_and_data(tiny_model_config, vocab_size=96)
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 4, 2), ('data', 'fsdp', 'tensor'))
  rules = [('batch', ('data', 'fsdp')), ('vocab', ('fsdp', 'tensor')), ('embed', 'fsdp')]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _assert_same_model(config, params, tokens)


def test_auto_mixes_per_vocabulary_row_when_a_batch_has_more_tokens_than_rows():
  assert resolve_memory_mix('auto', 256 * 4096, 151_680) == 'vocabulary'
  assert resolve_memory_mix('auto', 8 * 512, 151_680) == 'tokens'
  assert resolve_memory_mix('tokens', 256 * 4096, 151_680) == 'tokens'
