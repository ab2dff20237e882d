"""The fold (spec section 3): folded and training forms give the same logits for every variant."""

import itertools

import flax.linen as nn
import jax
import numpy as np
import pytest

from meki_jax.fold import fold_params
from meki_jax.model.meki import FUSIONS, MEMORIES, POSITIONS, PROJECTIONS
from meki_jax.model.transformer import build_model

# Every memory x position pair, with the fusions and projections cycled through them.
VARIANTS = [dict(memory=memory, position=position, fusion=list(FUSIONS)[i % len(FUSIONS)],
                 projection=PROJECTIONS[(i // 2) % len(PROJECTIONS)])
            for i, (memory, position) in enumerate(itertools.product(MEMORIES, POSITIONS))]
# The default run takes four variants that together cover every memory, position, fusion and
# projection, the paper's (both, parallel_ffn) among them; the slow step runs the other eight
# (each compiles two models: 12-25 s on 2 cores).
DEFAULT_RUN = ('static-after_ffn', 'dynamic-parallel_attention', 'both-parallel_ffn',
               'both-after_attention')
VARIANT_PARAMS = [pytest.param(v, id='-'.join(v.values()), marks=(
    () if f"{v['memory']}-{v['position']}" in DEFAULT_RUN else pytest.mark.slow))
                  for v in VARIANTS]
# The bound: max |folded - training| <= 1e-5 x max |logits| in float32.
RELATIVE_TOL = 1e-5


def _trained_like_params(model, token_ids):
  """Initial params moved off their init values (alpha, beta and norm scales != 1)."""
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), token_ids)['params'])
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  moved = [leaf + 0.5 * leaf.std() * jax.random.normal(key, leaf.shape)
           if leaf.ndim > 1 else leaf * jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
           for leaf, key in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, moved)


@pytest.mark.parametrize('variant', VARIANT_PARAMS)
def test_folded_logits_equal_training_logits(tiny_model_config, variant):
  config = tiny_model_config(meki=variant)
  token_ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, config.vocab_size)
  params = _trained_like_params(build_model(config), token_ids)
  logits = build_model(config).apply({'params': params}, token_ids)

  folded = fold_params(params, config, chunk_rows=40)  # 97 rows: chunks of 40, 40, 17
  folded_logits = build_model(config, folded=True).apply({'params': folded}, token_ids)
  error = np.abs(folded_logits - logits).max() / np.abs(logits).max()
  assert error <= RELATIVE_TOL, f'relative error {error:.2e}'


def test_authors_release_fold_absorbs_the_projection_norm(tiny_model_config):
  """authors_release (spec 6a): G's input RMSNorm with its learned gain on E[x] is folded into
  M~ with the rest of (1)-(3), exactly; the folded model keeps no trace of it."""
  config = tiny_model_config(flavor='authors_release', qk_norm=False)
  token_ids = jax.random.randint(jax.random.PRNGKey(2), (2, 9), 0, config.vocab_size)
  params = _trained_like_params(build_model(config), token_ids)
  gain = np.random.default_rng(0).uniform(0.5, 2.0, (2, 32)).astype(np.float32)  # [L, d_model]
  params['layers']['meki']['memory']['projection_norm']['scale'] = gain
  logits = build_model(config).apply({'params': params}, token_ids)
  folded = fold_params(params, config, chunk_rows=40)
  assert 'memory' not in folded['layers']['meki']
  folded_logits = build_model(config, folded=True).apply({'params': folded}, token_ids)
  error = np.abs(folded_logits - logits).max() / np.abs(logits).max()
  assert error <= RELATIVE_TOL, f'relative error {error:.2e}'
  # Without the gain the fold is a different table: the test sees the norm.
  params['layers']['meki']['memory']['projection_norm']['scale'] = np.ones_like(gain)
  other = build_model(config, folded=True).apply({'params': fold_params(params, config)},
                                                 token_ids)
  assert np.abs(other - folded_logits).max() > 100 * RELATIVE_TOL * np.abs(logits).max()


def test_fold_removes_training_only_parameters(tiny_model_config):
  config = tiny_model_config()
  token_ids = np.zeros((1, 3), np.int32)
  params = nn.meta.unbox(build_model(config).init(jax.random.PRNGKey(0), token_ids)['params'])
  folded = fold_params(params, config)
  assert 'memory' not in folded['layers']['meki']
  assert folded['layers']['meki']['folded_memory'].shape == (2, config.vocab_size, 8)
  expected = nn.meta.unbox(build_model(config, folded=True).init(
      jax.random.PRNGKey(0), token_ids)['params'])
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, tree)
  assert shapes(folded) == shapes(expected)


def test_host_rows_replace_the_table_lookup(tiny_model_config):
  """Feeding M~ rows as `memory_rows` (the host-resident path) equals the in-model lookup."""
  config = tiny_model_config()
  token_ids = jax.random.randint(jax.random.PRNGKey(3), (2, 5), 0, config.vocab_size)
  params = _trained_like_params(build_model(config), token_ids)
  folded = fold_params(params, config)
  model = build_model(config, folded=True)
  rows = folded['layers']['meki']['folded_memory'][:, np.asarray(token_ids)]  # [L, B, S, m]
  without_table = {**folded, 'layers': {**folded['layers'], 'meki': {
      k: v for k, v in folded['layers']['meki'].items() if k != 'folded_memory'}}}
  np.testing.assert_array_equal(model.apply({'params': folded}, token_ids),
                                model.apply({'params': without_table}, token_ids,
                                            memory_rows=rows))
