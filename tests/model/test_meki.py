"""The MeKi branch: equations (1)-(8), every variant's parameters and gradients, the dense case."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meki_jax.model.meki import FUSIONS, MEMORIES, POSITIONS, PROJECTIONS, MekiBranch
from meki_jax.model.transformer import build_model

VARIANTS = [dict(memory=memory, position=position, fusion=list(FUSIONS)[i % len(FUSIONS)],
                 projection=PROJECTIONS[i % len(PROJECTIONS)])
            for i, (memory, position) in enumerate(itertools.product(MEMORIES, POSITIONS))]
# The default run takes four variants that together cover every memory, position, fusion and
# projection, the paper's (both, parallel_ffn) among them; the slow step runs the other eight
# (each compiles its own model: 12-25 s on 2 cores).
DEFAULT_RUN = ('static-after_ffn', 'dynamic-parallel_attention', 'both-parallel_ffn',
               'both-after_attention')
VARIANT_PARAMS = [pytest.param(v, id='-'.join(v.values()), marks=(
    () if f"{v['memory']}-{v['position']}" in DEFAULT_RUN else pytest.mark.slow))
                  for v in VARIANTS]


def _rms_norm(x, scale, eps=1e-6):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def test_branch_matches_equations_1_to_6(tiny_model_config):
  """MekiBranch == a direct numpy transcription of spec equations (1)-(6), default variant."""
  config = tiny_model_config()
  rng = np.random.default_rng(0)
  hidden = rng.normal(size=(2, 5, config.d_model)).astype(np.float32)
  token_ids = rng.integers(0, config.vocab_size, size=(2, 5))
  embedding = rng.normal(size=(config.vocab_size, config.d_model)).astype(np.float32)
  branch = MekiBranch(config)
  params = nn.meta.unbox(branch.init(jax.random.PRNGKey(0), hidden, token_ids,
                                     embedding[token_ids])['params'])
  params = jax.tree_util.tree_map(lambda p: p + rng.normal(size=p.shape).astype(np.float32) * 0.3,
                                  params)  # move alpha, beta and the norm scales off 1.0
  out = branch.apply({'params': params}, hidden, token_ids, embedding[token_ids])

  memory = params['memory']
  proj = memory['projection']
  silu = lambda x: x / (1 + np.exp(-x))
  sigmoid = lambda x: 1 / (1 + np.exp(-x))
  e_rows = embedding[token_ids]
  static = memory['memory_table'][token_ids]  # (1)
  dynamic = (silu(e_rows @ proj['gate']['kernel']) * (e_rows @ proj['up']['kernel'])
             ) @ proj['down']['kernel']  # (2)
  e = memory['alpha'] * _rms_norm(static + memory['beta'] * dynamic,
                                  memory['mix_norm']['scale'])  # (3)
  g = sigmoid(hidden @ params['gate']['kernel'])  # (4)
  v = e + g  # (5)
  y = _rms_norm(v @ params['out']['kernel'], params['post_norm']['scale'])  # (6)
  np.testing.assert_allclose(out, y, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_every_variant_has_its_parameters_and_gradients(tiny_model_config, variant):
  config = tiny_model_config(meki=variant)
  token_ids = jax.random.randint(jax.random.PRNGKey(1), (2, 6), 0, config.vocab_size)
  model = build_model(config)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), token_ids)['params'])
  memory = params['layers']['meki']['memory']
  assert ('memory_table' in memory) == (variant['memory'] != 'dynamic')
  assert ('projection' in memory) == ('beta' in memory) == (variant['memory'] != 'static')
  if 'memory_table' in memory:
    assert memory['memory_table'].shape == (config.num_layers, config.vocab_size, 8)
  has_pre_norm = variant['position'] in ('after_attention', 'after_ffn')
  assert ('pre_meki_norm' in params['layers']) == has_pre_norm

  loss = lambda p: jnp.mean(jnp.square(model.apply({'params': p}, token_ids)))
  grads = jax.grad(loss)(params)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads['layers']['meki']):
    assert np.isfinite(grad).all(), path
    assert np.abs(grad).max() > 0, f'no gradient reaches {jax.tree_util.keystr(path)}'
  if 'memory_table' in memory:  # only the looked-up rows of M receive gradient
    touched = np.abs(grads['layers']['meki']['memory']['memory_table']).sum(axis=(0, 2)) > 0
    np.testing.assert_array_equal(np.flatnonzero(touched), np.unique(token_ids))


@pytest.mark.parametrize('dense', [dict(d_mem=0), dict(enabled=False)], ids=['d_mem=0', 'off'])
def test_disabled_meki_is_the_dense_baseline(tiny_model_config, dense):
  token_ids = jnp.zeros((1, 4), jnp.int32)
  meki_params = build_model(tiny_model_config(meki=dense)).init(jax.random.PRNGKey(0), token_ids)
  baseline = tiny_model_config(meki=dict(d_mem=0, enabled=False))
  dense_params = build_model(baseline).init(jax.random.PRNGKey(0), token_ids)
  assert 'meki' not in meki_params['params']['layers']
  assert (jax.tree_util.tree_structure(meki_params) == jax.tree_util.tree_structure(dense_params))
