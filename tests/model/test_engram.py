"""The Engram baseline (DeepSeek's hashed n-gram memory): equations, hashing, gradients, causality,
packed rows, sharding, parameter counts, and what the fold and the decode model do with it."""


import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from meki_jax import sharding
from meki_jax.config import ConfigError, validate_model
from meki_jax.fold import fold_params
from meki_jax.model.engram import (EngramMemory, add_engram, hash_moduli, hash_multipliers,
                                   ngram_hash_ids)
from meki_jax.model.transformer import build_model
from meki_jax.param_count import count_params
from tests.model.random_model import model_and_params, moved, one_document, rms_norm

ENGRAM = dict(enabled=True, layers=(1,), ngram_orders=(2, 3), num_heads=2, head_width=4,
              rows_per_head=64, conv_kernel=4)
HEADS = 2 * 2  # orders x heads
SEGMENTS = np.array([[1] * 5 + [2] * 12, [1] * 17])  # row 0 packs two documents


@pytest.fixture
def engram_config(tiny_model_config):
  config = tiny_model_config(vocab_size=128, meki=dict(enabled=False))  # 128 rows: 8 x 16
  config.engram.update(ENGRAM)
  return validate_model(config)


def _numpy_engram(config, p, token_ids, segment_ids, hidden):
  """The module docstring's equations, token by token, for Engram layer 1."""
  engram, vocab = config.engram, config.vocab_size
  moduli, multipliers = hash_moduli(engram)[0], hash_multipliers(engram, 1, vocab)
  batch, seq = token_ids.shape
  same = lambda b, t, back: t - back >= 0 and segment_ids[b, t - back] == segment_ids[b, t]
  memory = np.zeros((batch, seq, HEADS * engram.head_width), np.float32)
  for b in range(batch):
    for t in range(seq):
      history = [int(token_ids[b, t - k]) if same(b, t, k) else vocab for k in range(3)]
      bigram = (history[0] * int(multipliers[0])) ^ (history[1] * int(multipliers[1]))
      trigram = bigram ^ (history[2] * int(multipliers[2]))
      rows = [gram % int(moduli[2 * order + head]) + (2 * order + head) * engram.rows_per_head
              for order, gram in enumerate((bigram, trigram)) for head in range(2)]
      memory[b, t] = p['ngram_table'][rows].reshape(-1)  # e_t
  key = rms_norm(memory @ p['key']['kernel'], p['key_norm']['scale'])
  value = memory @ p['value']['kernel']
  score = np.sum(rms_norm(hidden, p['query_norm_scale']) * key, -1, keepdims=True)
  score = score / np.sqrt(config.d_model)
  score = np.sign(score) * np.sqrt(np.maximum(np.abs(score), 1e-6))
  gated = value / (1 + np.exp(-score))  # u
  normed = rms_norm(gated, p['conv_norm_scale'])
  conv = np.zeros_like(gated)
  for b in range(batch):
    for t in range(seq):
      for k in range(engram.conv_kernel):  # dilation 3, the largest order
        if same(b, t, 3 * k):
          conv[b, t] += p['conv_kernel'][k] * normed[b, t - 3 * k]
  return hidden + gated + conv / (1 + np.exp(-conv))


def test_memory_and_fusion_match_the_equations(engram_config):
  rng = np.random.default_rng(0)
  token_ids = rng.integers(0, engram_config.vocab_size, size=SEGMENTS.shape)
  hidden = rng.normal(size=SEGMENTS.shape + (engram_config.d_model,)).astype(np.float32)
  module = EngramMemory(engram_config)
  params = jax.jit(lambda: moved(module.init(jax.random.PRNGKey(0), token_ids, SEGMENTS)))()
  memory = jax.jit(module.apply)(params, token_ids, SEGMENTS)
  assert memory['key'].shape == memory['value'].shape == (1,) + hidden.shape
  fuse = jax.jit(lambda slot: add_engram(hidden, slot, memory, SEGMENTS, engram_config))
  fused = fuse(0)
  layer = jax.tree_util.tree_map(np.asarray, params['params']['layer_1'])
  expected = _numpy_engram(engram_config, layer, token_ids, SEGMENTS, hidden)
  np.testing.assert_allclose(fused, expected, rtol=1e-4, atol=1e-5)
  np.testing.assert_array_equal(fuse(-1), hidden)


def test_hashes_use_distinct_primes_and_stay_in_their_heads_rows(engram_config):
  engram = engram_config.engram
  moduli = hash_moduli(engram)
  assert len(set(moduli.ravel())) == moduli.size and moduli.max() <= engram.rows_per_head
  token_ids = np.random.default_rng(1).integers(0, engram_config.vocab_size, size=(3, 40))
  rows = ngram_hash_ids(jnp.asarray(token_ids), jnp.ones_like(token_ids), engram,
                        hash_multipliers(engram, 1, engram_config.vocab_size), moduli[0],
                        pad_id=engram_config.vocab_size)
  head_start = np.arange(HEADS) * engram.rows_per_head
  assert rows.shape == (3, 40, HEADS)
  assert ((rows >= head_start) & (rows < head_start + moduli[0])).all()
  engram_config.engram.rows_per_head = 5  # primes 5, 3, 2 for 4 heads
  with pytest.raises(ConfigError, match='model.engram.rows_per_head=5 has 3 primes'):
    validate_model(engram_config)


def test_no_ngram_spans_a_document_start(engram_config):
  """The second document of a packed row hashes exactly as it does alone."""
  engram = engram_config.engram
  token_ids = np.random.default_rng(2).integers(0, engram_config.vocab_size, size=(1, 17))
  hash_ids = lambda ids, segments: ngram_hash_ids(
      jnp.asarray(ids), jnp.asarray(segments), engram,
      hash_multipliers(engram, 1, engram_config.vocab_size), hash_moduli(engram)[0],
      pad_id=engram_config.vocab_size)
  packed = hash_ids(token_ids, SEGMENTS[:1])
  alone = hash_ids(token_ids[:, 5:], np.ones((1, 12), np.int32))
  np.testing.assert_array_equal(packed[:, 5:], alone)
  assert (hash_ids(token_ids, np.ones((1, 17), np.int32))[:, 5:7] != alone[:, :2]).any()


def test_model_shapes_and_gradients_reach_every_engram_parameter(engram_config):
  token_ids = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, engram_config.vocab_size)
  forward, params = model_and_params(engram_config)
  layer = params['engram']['layer_1']
  assert layer['ngram_table'].shape == (HEADS * 64, 4)
  assert layer['conv_kernel'].shape == (4, engram_config.d_model)

  def loss(p):
    logits = forward(p, token_ids, *one_document(token_ids))
    return jnp.mean(jnp.square(logits)), logits.shape

  grads, shape = jax.jit(jax.grad(loss, has_aux=True))(params)
  assert shape == (2, 9, engram_config.vocab_size)
  for path, grad in jax.tree_util.tree_leaves_with_path(grads['engram']):
    assert np.isfinite(grad).all() and np.abs(grad).max() > 0, jax.tree_util.keystr(path)


def test_a_future_token_leaves_earlier_logits_unchanged(engram_config):
  token_ids = jax.random.randint(jax.random.PRNGKey(2), (1, 17), 0, engram_config.vocab_size)
  forward, params = model_and_params(engram_config)
  changed = token_ids.at[0, 8].set((token_ids[0, 8] + 1) % engram_config.vocab_size)
  logits, changed_logits = (forward(params, ids, *one_document(ids))
                            for ids in (token_ids, changed))
  np.testing.assert_array_equal(logits[:, :8], changed_logits[:, :8])
  assert np.abs(logits[:, 8:] - changed_logits[:, 8:]).max() > 0


def test_a_packed_document_equals_the_document_alone(engram_config):
  """Hashes, the conv (which reaches 9 tokens back) and attention all stop at the document."""
  token_ids = jax.random.randint(jax.random.PRNGKey(3), (1, 17), 0, engram_config.vocab_size)
  positions = jnp.asarray([list(range(5)) + list(range(12))])
  forward, params = model_and_params(engram_config)
  packed = forward(params, token_ids, positions, jnp.asarray(SEGMENTS[:1]))
  alone = forward(params, token_ids[:, 5:], *one_document(token_ids[:, 5:]))
  # Other shapes change the order of float32 sums: agreement to 1e-5 of the largest logit.
  np.testing.assert_allclose(packed[:, 5:], alone, rtol=0, atol=1e-5 * np.abs(alone).max())


def test_tables_shard_over_vocab_and_give_the_single_device_logits(engram_config):
  """On fsdp=8, each device holds 1/8 of every n-gram table's rows; logits match one device."""
  config = engram_config
  token_ids = jax.random.randint(jax.random.PRNGKey(4), (8, 9), 0, config.vocab_size)
  forward, params = model_and_params(config)
  single = forward(params, token_ids, *one_document(token_ids))

  mesh_config = base.get_config().mesh
  mesh_config.shape = ml_collections.ConfigDict(dict(data=1, fsdp=8, tensor=1))
  mesh, rules = sharding.make_mesh(mesh_config), sharding.axis_rules(mesh_config)
  model = build_model(config)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), token_ids)['params']
  sharded = jax.device_put(params, sharding.logical_shardings(abstract, mesh, rules))
  table = sharded['engram']['layer_1']['ngram_table']
  assert {shard.data.shape for shard in table.addressable_shards} == {(HEADS * 64 // 8, 4)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = jax.jit(lambda p, *args: model.apply({'params': p}, *args))(
        sharded, token_ids, *one_document(token_ids))
  np.testing.assert_allclose(logits, single, rtol=0, atol=1e-5 * np.abs(single).max())


def test_parameter_counts_match_the_hand_formula(engram_config, tiny_model_config):
  """ROM = layers x orders x heads x rows x width; RAM over dense, per Engram layer:
  W_K and W_V (e -> d), the key, query and conv norms (3d) and the conv kernel (K x d)."""
  d, width = engram_config.d_model, HEADS * 4
  counts = count_params(engram_config)
  dense = count_params(tiny_model_config(vocab_size=128, meki=dict(enabled=False)))
  assert counts['rom_params'] == 1 * HEADS * 64 * 4
  assert counts['ram_params'] - dense['ram_params'] == 2 * width * d + 3 * d + 4 * d
  assert counts['train_params'] == 0
  assert counts['train_total_params'] == counts['ram_params'] + counts['rom_params']


def test_fold_passes_engram_through_and_decode_refuses_it(tiny_model_config):
  """With MeKi on as well, the fold only replaces MeKi's memory: Engram's parameters are kept
  and the result is the folded model's tree."""
  config = tiny_model_config()
  config.engram.update(ENGRAM)
  _, params = model_and_params(config)
  folded = fold_params(params, config)
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: a is b, folded['engram'], params['engram']))
  expected = jax.eval_shape(build_model(config, folded=True).init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 1), jnp.int32))['params']
  shapes = lambda tree: jax.tree_util.tree_map(np.shape, nn.meta.unbox(tree))
  assert shapes(folded) == shapes(expected)
  with pytest.raises(ValueError, match='model.engram.enabled=True'):
    build_model(config, decode=True)
