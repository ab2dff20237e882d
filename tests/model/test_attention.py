"""Causality and document isolation of the full model: what a position sees, and what it cannot."""

import jax
import jax.numpy as jnp
import numpy as np

from meki_jax.model.attention import document_causal_mask
from meki_jax.model.transformer import build_model

TOL = 1e-5  # fp32; unrelated inputs must leave outputs bit-close, not merely similar


def _init(config, token_ids):
  model = build_model(config)
  return model, model.init(jax.random.PRNGKey(0), token_ids)


def test_mask_is_causal_and_per_document():
  segment_ids = jnp.array([[1, 1, 2, 2, 0]])
  mask = np.asarray(document_causal_mask(segment_ids))[0, 0, 0]
  expected = np.array([[1, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0],
                       [0, 0, 1, 0, 0],
                       [0, 0, 1, 1, 0],
                       [0, 0, 0, 0, 1]], bool)
  np.testing.assert_array_equal(mask, expected)


def test_changing_a_later_token_leaves_earlier_logits_unchanged(tiny_model_config):
  config = tiny_model_config()
  token_ids = jax.random.randint(jax.random.PRNGKey(1), (2, 12), 0, config.vocab_size)
  model, variables = _init(config, token_ids)
  changed = token_ids.at[:, 7].set((token_ids[:, 7] + 1) % config.vocab_size)
  before, after = model.apply(variables, token_ids), model.apply(variables, changed)
  np.testing.assert_allclose(before[:, :7], after[:, :7], atol=TOL)
  assert np.abs(before[:, 7:] - after[:, 7:]).max() > 1e-3


def test_a_packed_document_sees_neither_its_neighbour_nor_its_offset(tiny_model_config):
  """Document B packed after document A gives the logits B gives alone at positions 0.."""
  config = tiny_model_config()
  doc_a = jax.random.randint(jax.random.PRNGKey(2), (1, 5), 0, config.vocab_size)
  doc_b = jax.random.randint(jax.random.PRNGKey(3), (1, 7), 0, config.vocab_size)
  packed = jnp.concatenate([doc_a, doc_b], axis=1)
  segment_ids = jnp.array([[1] * 5 + [2] * 7])
  positions = jnp.array([list(range(5)) + list(range(7))])
  model, variables = _init(config, packed)
  packed_logits = model.apply(variables, packed, positions, segment_ids)
  alone_logits = model.apply(variables, doc_b)
  np.testing.assert_allclose(packed_logits[:, 5:], alone_logits, atol=TOL)

  other_a = (doc_a + 1) % config.vocab_size
  repacked = model.apply(variables, jnp.concatenate([other_a, doc_b], axis=1), positions,
                         segment_ids)
  np.testing.assert_allclose(repacked[:, 5:], packed_logits[:, 5:], atol=TOL)
