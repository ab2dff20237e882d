"""The chunked loss equals the whole-logits cross-entropy: loss and gradients, tied embeddings,
loss mask, and one chunk vs many."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from meki_jax.model.transformer import build_model
from meki_jax.train import step as step_lib
from meki_jax.train.loss import chunked_loss_sum


def _batch(vocab_size, batch=2, seq=32, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, size=(batch, seq + 1)).astype(np.int32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'segment_ids': np.ones((batch, seq), np.int32),
          'positions': np.arange(seq, dtype=np.int32)[None].repeat(batch, 0),
          'loss_mask': (rng.random((batch, seq)) > 0.3).astype(np.float32)}


def _whole_logits_loss(model, params, batch):
  """Today's reference: the full logits [b, seq, vocab], then optax's cross-entropy."""
  logits = model.apply({'params': params}, batch['inputs'], batch['positions'],
                       batch['segment_ids'])
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['targets'])
  return jnp.sum(losses * batch['loss_mask'])


@pytest.mark.parametrize('chunk_len', [0, 8, 32])
def test_chunked_loss_and_gradients_equal_the_whole_logits(tiny_model_config, chunk_len):
  config = tiny_model_config(loss_chunk_len=chunk_len)
  model = build_model(config)
  batch = _batch(config.vocab_size)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), batch['inputs'])['params'])
  chunked = lambda p: step_lib.loss_sums(p, model, batch)[0]
  loss, grads = jax.jit(jax.value_and_grad(chunked))(params)
  ref_loss, ref_grads = jax.jit(jax.value_and_grad(
      functools.partial(_whole_logits_loss, model)))(params, batch)
  np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
  assert float(jnp.abs(grads['embed']['embedding']).max()) > 0  # tied: input and output use
  for path, actual in jax.tree_util.tree_leaves_with_path(grads):
    expected = functools.reduce(lambda tree, key: tree[key.key], path, ref_grads)
    scale = float(jnp.max(jnp.abs(expected)))
    np.testing.assert_allclose(actual, expected, atol=1e-5 * scale, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def test_masked_positions_carry_no_loss_and_no_gradient():
  rng = np.random.default_rng(1)
  hidden = jnp.asarray(rng.normal(size=(2, 16, 8)), jnp.float32)
  embedding = jnp.asarray(rng.normal(size=(11, 8)), jnp.float32)
  targets = jnp.asarray(rng.integers(0, 11, size=(2, 16)), jnp.int32)
  mask = jnp.ones((2, 16)).at[1, 5:].set(0.0)
  loss = lambda h: chunked_loss_sum(h, embedding, targets, mask, 4)
  grads = jax.jit(jax.grad(loss))(hidden)
  assert float(jnp.abs(grads[1, 5:]).max()) == 0.0
  changed = targets.at[1, 9].set((targets[1, 9] + 1) % 11)
  assert float(loss(hidden)) == float(chunked_loss_sum(hidden, embedding, changed, mask, 4))


def test_a_chunk_that_does_not_divide_the_sequence_is_refused():
  hidden, embedding = jnp.zeros((1, 12, 4)), jnp.zeros((5, 4))
  with pytest.raises(ValueError, match='sequence length 12 is not a multiple of '
                     'model.loss_chunk_len=8'):
    chunked_loss_sum(hidden, embedding, jnp.zeros((1, 12), jnp.int32), jnp.ones((1, 12)), 8)
