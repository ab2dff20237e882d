"""The PLE baseline (Gemma 3n per-layer embeddings): equations, gradients, causality, packed rows,
parameter counts, and what the fold and the decode model do with it."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meki_jax.fold import fold_params
from meki_jax.model.ple import PerLayerBranch, PerLayerInputs
from meki_jax.model.transformer import build_model
from meki_jax.param_count import count_params
from tests.model.random_model import model_and_params, moved, one_document, rms_norm

D_PLE = 6


@pytest.fixture
def ple_config(tiny_model_config):
  config = tiny_model_config(meki=dict(enabled=False))
  config.ple.update(enabled=True, d_ple=D_PLE)
  return config


def test_inputs_and_branch_match_gemma_3n(ple_config):
  """PerLayerInputs and PerLayerBranch == a numpy transcription of the module docstring."""
  cfg, rng = ple_config, np.random.default_rng(0)
  token_ids = rng.integers(0, cfg.vocab_size, size=(2, 5))
  embed_rows = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
  hidden = rng.normal(size=(2, 5, cfg.d_model)).astype(np.float32)
  inputs_module, branch = PerLayerInputs(cfg), PerLayerBranch(cfg)
  inputs_params = jax.jit(lambda: moved(inputs_module.init(jax.random.PRNGKey(0), token_ids,
                                                            embed_rows)))()
  inputs = jax.jit(inputs_module.apply)(inputs_params, token_ids, embed_rows)
  assert inputs.shape == (cfg.num_layers, 2, 5, D_PLE)

  p = inputs_params['params']
  rows = p['per_layer_table'][token_ids].reshape(2, 5, cfg.num_layers, D_PLE) * np.sqrt(D_PLE)
  projected = rms_norm((embed_rows @ p['projection']['kernel']).reshape(2, 5, -1, D_PLE),
                        p['projection_norm']['scale'])
  expected = ((projected + rows) / np.sqrt(2)).transpose(2, 0, 1, 3)
  np.testing.assert_allclose(inputs, expected, rtol=1e-4, atol=1e-5)

  branch_params = jax.jit(lambda: moved(branch.init(jax.random.PRNGKey(0), hidden,
                                                     inputs[1])))()
  out = jax.jit(branch.apply)(branch_params, hidden, inputs[1])
  b = branch_params['params']
  gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))
  gated = gelu(hidden @ b['gate']['kernel']) * np.asarray(inputs[1])
  np.testing.assert_allclose(out, rms_norm(gated @ b['up']['kernel'], b['post_norm']['scale']),
                             rtol=1e-4, atol=1e-5)


def test_model_shapes_and_gradients_reach_every_ple_parameter(ple_config):
  token_ids = jax.random.randint(jax.random.PRNGKey(1), (2, 7), 0, ple_config.vocab_size)
  forward, params = model_and_params(ple_config)
  assert params['ple']['per_layer_table'].shape == (ple_config.vocab_size, 2 * D_PLE)
  assert params['layers']['ple']['gate']['kernel'].shape == (2, ple_config.d_model, D_PLE)

  def loss(p):
    logits = forward(p, token_ids)
    return jnp.mean(jnp.square(logits)), logits.shape

  grads, shape = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert shape == (2, 7, ple_config.vocab_size)
  ple_grads = {'ple': grads['ple'], 'layers/ple': grads['layers']['ple']}
  for path, grad in jax.tree_util.tree_leaves_with_path(ple_grads):
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0, jax.tree_util.keystr(path)
  touched = np.abs(grads['ple']['per_layer_table']).sum(axis=1) > 0  # only looked-up rows
  np.testing.assert_array_equal(np.flatnonzero(touched), np.unique(token_ids))


def test_a_future_token_leaves_earlier_logits_unchanged(ple_config):
  token_ids = jax.random.randint(jax.random.PRNGKey(2), (1, 11), 0, ple_config.vocab_size)
  forward, params = model_and_params(ple_config)
  changed = token_ids.at[0, 5].set((token_ids[0, 5] + 1) % ple_config.vocab_size)
  logits, changed_logits = (forward(params, ids, *one_document(ids))
                            for ids in (token_ids, changed))
  np.testing.assert_array_equal(logits[:, :5], changed_logits[:, :5])
  assert np.abs(logits[:, 5:] - changed_logits[:, 5:]).max() > 0


def test_a_packed_document_equals_the_document_alone(ple_config):
  first, second = np.arange(3, 8), np.arange(40, 46)
  packed = jnp.asarray(np.concatenate([first, second])[None])
  segment_ids = jnp.asarray([[1] * 5 + [2] * 6])
  positions = jnp.asarray([list(range(5)) + list(range(6))])
  forward, params = model_and_params(ple_config)
  packed_logits = forward(params, packed, positions, segment_ids)
  alone = forward(params, jnp.asarray(second[None]), *one_document(jnp.asarray(second[None])))
  # Other shapes change the order of float32 sums: agreement to 1e-5 of the largest logit.
  np.testing.assert_allclose(packed_logits[:, 5:], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_parameter_counts_match_the_hand_formula(ple_config, tiny_model_config):
  """ROM = V x L x d_ple; RAM over dense = W_proj + its norm + L x (W_gate + W_up + post_norm)."""
  v, layers, d = ple_config.vocab_size, ple_config.num_layers, ple_config.d_model
  counts = count_params(ple_config)
  dense = count_params(tiny_model_config(meki=dict(enabled=False)))
  assert counts['rom_params'] == v * layers * D_PLE
  assert counts['ram_params'] - dense['ram_params'] == (
      d * layers * D_PLE + D_PLE + layers * (2 * d * D_PLE + d))
  assert counts['train_params'] == 0  # nothing is removed by the fold
  assert counts['train_total_params'] == counts['ram_params'] + counts['rom_params']


def test_fold_passes_ple_through_and_decode_refuses_it(tiny_model_config):
  """With MeKi on as well, the fold only replaces MeKi's memory: PLE's parameters are kept and
  the result is the folded model's tree."""
  config = tiny_model_config()
  config.ple.update(enabled=True, d_ple=D_PLE)
  _, params = model_and_params(config)
  folded = fold_params(params, config)
  for kept in (lambda tree: tree['ple'], lambda tree: tree['layers']['ple']):
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda a, b: a is b, kept(folded), kept(params)))
  expected = jax.eval_shape(build_model(config, folded=True).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))['params']
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, nn.meta.unbox(tree))
  assert shapes(folded) == shapes(expected)
  with pytest.raises(ValueError, match='model.ple.enabled=True'):
    build_model(config, decode=True)
