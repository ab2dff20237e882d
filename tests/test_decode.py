"""KV-cache decoding: cached steps reproduce the full forward pass, the fold does not change what
is generated, sampling keeps to its candidates, and bad prompts fail with the reason."""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from meki_jax import decode
from meki_jax.fold import fold_params
from meki_jax.model.transformer import build_model

# fp32; the cached step sums attention over the whole (masked) cache instead of the sequence.
RELATIVE_TOL = 1e-5


def _params(config):
  """Initial params moved off their init values (alpha, beta and norm scales != 1)."""
  return _moved_params(config.to_json())


@functools.lru_cache(maxsize=None)
def _moved_params(config_json):  # one initialisation per config for the whole session
  config = ml_collections.ConfigDict(json.loads(config_json))
  params = nn.meta.unbox(jax.jit(build_model(config).init)(jax.random.PRNGKey(0),
                                                           jnp.zeros((1, 1), jnp.int32))['params'])
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
  moved = jax.jit(lambda leaves: [
      leaf + 0.5 * leaf.std() * jax.random.normal(key, leaf.shape) if leaf.ndim > 1
      else leaf * jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
      for leaf, key in zip(leaves, keys)])(leaves)
  return jax.tree_util.tree_unflatten(treedef, moved)


def _decoder(config, params, folded=False):
  return build_model(config, folded=folded, decode=True), decode.decode_params(params, config)


PROMPTS = [[5, 17, 3, 88, 41], [9, 2, 60, 33, 71, 12, 8, 50], [77]]


RELEASE = dict(flavor='authors_release', qk_norm=False)


@pytest.mark.parametrize('meki, flavor', [
    pytest.param(dict(), {}, id='meki'), pytest.param(dict(d_mem=0), {}, id='dense'),
    pytest.param(dict(), RELEASE, id='meki-authors_release', marks=pytest.mark.slow),
    pytest.param(dict(d_mem=0), RELEASE, id='dense-authors_release', marks=pytest.mark.slow)])
def test_cached_steps_give_the_full_forward_logits(tiny_model_config, meki, flavor):
  """Rows of different lengths, a chunked prefill, then teacher-forced single-token steps."""
  config = tiny_model_config(meki=meki, **flavor)
  params = _params(config)
  sequences = np.array(jax.random.randint(jax.random.PRNGKey(3), (len(PROMPTS), 14), 0,
                                          config.vocab_size))
  lengths = np.array([len(prompt) for prompt in PROMPTS])
  for row, prompt in enumerate(PROMPTS):
    sequences[row, :len(prompt)] = prompt
  full_logits = build_model(config).apply({'params': params}, sequences)  # [batch, 14, vocab]

  model, decode_params = _decoder(config, params)
  cache = decode.init_cache(config, len(PROMPTS), 16)
  padded = decode.right_pad(PROMPTS, lengths)
  cache = decode.prefill_prompt_prefix(model, decode_params, cache, padded[:, :-1], chunk_len=3)
  positions = lengths - 1
  for _ in range(14 - lengths.max()):
    token_ids = sequences[np.arange(len(PROMPTS)), positions]
    _, logits, cache = decode.decode_step(model, decode_params, cache, jnp.asarray(token_ids),
                                          jnp.asarray(positions), jax.random.PRNGKey(0),
                                          decode.Sampling())
    expected = full_logits[np.arange(len(PROMPTS)), positions]
    error = np.abs(logits - expected).max() / np.abs(expected).max()
    assert error <= RELATIVE_TOL, f'positions {positions}: relative error {error:.2e}'
    positions = positions + 1


@pytest.mark.parametrize('flavor', [{}, RELEASE], ids=['paper', 'authors_release'])
def test_folded_and_training_forms_generate_the_same_greedy_tokens(tiny_model_config, flavor):
  config = tiny_model_config(**flavor)
  params = _params(config)
  training = decode.generate(*_decoder(config, params), PROMPTS, max_new_tokens=10)
  folded = decode.generate(*_decoder(config, fold_params(params, config), folded=True), PROMPTS,
                           max_new_tokens=10)
  assert folded == training
  assert all(len(tokens) == 10 for tokens in folded)


def test_generation_stops_at_end_of_document(tiny_model_config):
  config = tiny_model_config()
  model, params = _decoder(config, _params(config))
  free = decode.generate(model, params, PROMPTS, max_new_tokens=8)
  eod_id = free[0][3]
  stopped = decode.generate(model, params, PROMPTS, max_new_tokens=8, eod_id=eod_id)
  for row, tokens in enumerate(free):
    expected = tokens[:tokens.index(eod_id)] if eod_id in tokens else tokens
    assert stopped[row] == expected


def test_sampling_keeps_to_top_k_and_top_p():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.1, 0.06, 0.04]] * 256))
  rngs = jax.random.split(jax.random.PRNGKey(0), 8)
  draw = lambda sampling: np.concatenate(
      [np.asarray(decode.sample_tokens(logits, rng, sampling)) for rng in rngs])
  assert set(draw(decode.Sampling(temperature=1.0, top_k=2))) == {0, 1}
  assert set(draw(decode.Sampling(temperature=1.0, top_p=0.85))) == {0, 1, 2}  # 0.5+0.3 < 0.85
  assert set(draw(decode.Sampling(temperature=1.0, top_k=4, top_p=0.85))) == {0, 1, 2}
  assert set(draw(decode.Sampling(temperature=1.0))) == {0, 1, 2, 3, 4}
  assert set(draw(decode.Sampling())) == {0}


def test_sampling_with_a_seed_is_reproducible(tiny_model_config):
  config = tiny_model_config()
  model, params = _decoder(config, _params(config))
  sampling = decode.Sampling(temperature=1.0, top_k=20, top_p=0.9)
  first = decode.generate(model, params, PROMPTS, max_new_tokens=6, sampling=sampling, seed=4)
  again = decode.generate(model, params, PROMPTS, max_new_tokens=6, sampling=sampling, seed=4)
  greedy = decode.generate(model, params, PROMPTS, max_new_tokens=6)
  assert first == again and first != greedy


@pytest.mark.parametrize('field, value, message', [
    ('temperature', -0.5, 'sampling.temperature=-0.5'),
    ('top_k', 1.5, 'sampling.top_k=1.5'),
    ('top_p', 0.0, r'sampling.top_p=0.0 must be in \(0, 1\]'),
])
def test_bad_sampling_settings_name_the_field(field, value, message):
  with pytest.raises(ValueError, match=message):
    decode.Sampling(**{field: value})


@pytest.mark.parametrize('prompts, cache_len, message', [
    ([[1, 2], []], 16, 'prompt 1 is empty'),
    ([], 16, 'no prompts'),
    ([[1, 2, 3]], 10, r'prompt 0 has 3 tokens: with max_new_tokens=8 it needs 11 cache slots, '
     r'but cache_len=10'),
    ([[1, 97, 2]], 16, r'prompt 0: token id 97 at index \(1,\) is outside \[0, '
     r'model.vocab_size=97\)'),
    ([[4, -1]], 16, r'prompt 0: token id -1'),
])
def test_bad_prompts_fail_with_the_reason(tiny_model_config, prompts, cache_len, message):
  model = build_model(tiny_model_config(), decode=True)
  with pytest.raises(ValueError, match=message):  # before any parameter is touched
    decode.generate(model, None, prompts, max_new_tokens=8, cache_len=cache_len)
