"""The authors_release flavor (spec section 6a) against a numpy transcription of the layer the
authors' released Megatron-LM trains (github ningding-o/MeKi, snapshot a196d7a, paths under
`Megatron-LM/megatron/core/`; the Transformer Engine layer spec of `train_1_7B_meki_dim_256.sh`),
and its init, weight decay, parameter count and FLOPs.

The transcription follows their modules, not ours: sequence-first activations [s, b, h]; weights
[out, in] as TE's linear layers hold them; the fused RMSNorm + linear of TE
(`TELayerNormColumnParallelLinear`, `layer_norm_weight`) where the spec builds one, the QKV
projection and the first linear of MeKi's projection G; the QKV weight interleaved per query
group. Equality with our layer was also checked by running their own GPTModel, TransformerLayer,
MeKi, MLP and RoPE on CPU beside ours (README, "Model flavors").
"""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import base
from meki_jax.model.transformer import DecoderLayer, build_model
from meki_jax.param_count import count_params
from meki_jax.train.flops import forward_flops_per_token
from meki_jax.train.optim import decay_mask

EPS = 1e-6  # --norm-epsilon 1e-6
GAINS = ('scale', 'alpha', 'beta')  # RMSNorm gains and MeKi's scalars: initialised to 1


def _rms(x, weight):
  """TE's RMSNorm (zero_centered_gamma off): x / sqrt(mean(x^2) + eps) * weight."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


def _silu(x):
  return x / (1 + np.exp(-x))


def _rotary_emb(seq_len, dim, base_theta):
  """models/common/embeddings/rotary_pos_embedding.py, RotaryEmbedding.forward(max_seq_len): the
  angles of positions 0 .. seq_len - 1 (GPTModel.forward calls it with the sequence length;
  position_ids never reach it), halves repeated: [s, 1, 1, dim]."""
  inv_freq = 1.0 / base_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  freqs = np.outer(np.arange(seq_len), inv_freq)  # get_freqs_non_repeated
  return np.concatenate([freqs, freqs], axis=-1)[:, None, None, :]


def _apply_rotary(t, emb):
  """models/common/embeddings/rope_utils.py, _apply_rotary_pos_emb_bshd with _rotate_half
  (rotary_interleaved off): t [s, b, heads, dim]."""
  x1, x2 = np.split(t, 2, axis=-1)
  return t * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)


def _megatron_mlp(x, fc1_weight, fc2_weight):
  """transformer/mlp.py, MLP.forward with gated_linear_unit (--swiglu): fc1 -> glu (chunk into
  [gate, up], silu(gate) * up) -> fc2."""
  gate, up = np.split(x @ fc1_weight.T, 2, axis=-1)
  return (_silu(gate) * up) @ fc2_weight.T


def _megatron_meki(hidden_states, input_ids, word_emb, w):
  """transformer/transformer_layer.py, MeKi.forward: hidden_states, word_emb [s, b, h] (word_emb is
  the embedding output, GPTModel.forward's `decoder_input`); input_ids [b, s] -> [s, b, h]."""
  static = w['embeddings.weight'][input_ids].transpose(1, 0, 2)  # embeddings(input_ids).T
  # word_emb_projection: an MLP built from the spec's MLP submodules, whose linear_fc1 is the TE
  # spec's TELayerNormColumnParallelLinear: RMSNorm with its own gain, then [gate; up]
  projection = w['word_emb_projection']
  dynamic = _megatron_mlp(_rms(word_emb, projection['linear_fc1.layer_norm_weight']),
                          projection['linear_fc1.weight'], projection['linear_fc2.weight'])
  memory = _rms(static + dynamic * w['beta_scale'], w['mix_norm.weight']) * w['alpha_scale']
  gate = hidden_states @ w['gate_proj.weight'].T
  fused = 1 / (1 + np.exp(-gate)) + memory  # sigmoid(gate).add(meki_embedding)
  return _rms(fused @ w['out_proj.weight'].T, w['post_norm.weight'])


def _megatron_layer(hidden_states, input_ids, word_emb, w, cfg):
  """transformer/transformer_layer.py, TransformerLayer.forward = _forward_attention then
  _forward_mlp: hidden_states [s, b, h] -> [s, b, h]."""
  s, b, _ = hidden_states.shape
  heads, groups, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_group = heads // groups
  attn = w['self_attention']
  # _forward_attention: input_layernorm is IdentityOp in the TE spec (models/gpt/
  # gpt_layer_specs.py); the norm is fused into linear_qkv (TELayerNormColumnParallelLinear).
  mixed_qkv = (_rms(hidden_states, attn['linear_qkv.layer_norm_weight'])
               @ attn['linear_qkv.weight'].T)
  # transformer/attention.py, get_query_key_value_tensors: view [s, b, groups, (g + 2) hd], split
  # into the group's g query heads, its key and its value
  mixed_qkv = mixed_qkv.reshape(s, b, groups, (per_group + 2) * hd)
  query = mixed_qkv[..., :per_group * hd].reshape(s, b, heads, hd)
  key = mixed_qkv[..., per_group * hd:(per_group + 1) * hd]  # [s, b, groups, hd]
  value = mixed_qkv[..., (per_group + 1) * hd:]
  emb = _rotary_emb(s, hd, cfg.rope_theta)
  query, key = _apply_rotary(query, emb), _apply_rotary(key, emb)
  # TEDotProductAttention with AttnMaskType.causal (the TE spec): TE uses the attention_mask only
  # for 'padding'/'arbitrary' mask types, so --reset-attention-mask's document mask is ignored
  # (NVIDIA/Megatron-LM#2357): causal over the whole row. Head i reads query group i // g.
  key, value = np.repeat(key, per_group, axis=2), np.repeat(value, per_group, axis=2)
  scores = np.einsum('sbnd,tbnd->bnst', query, key) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  context = np.einsum('bnst,tbnd->sbnd', probs, value).reshape(s, b, heads * hd)
  residual = hidden_states + context @ attn['linear_proj.weight'].T  # self_attn_bda
  # "Module 7": pre_mlp_layernorm is a real RMSNorm in their fork, and "Module 8" un-fuses the
  # MLP's linear_fc1 (TEColumnParallelLinear); _forward_mlp hands pre_mlp_layernorm_output to
  # both the MLP and MeKi and adds their sum to the residual (mlp_bda).
  pre_mlp_layernorm_output = _rms(residual, w['pre_mlp_layernorm.weight'])
  mlp = _megatron_mlp(pre_mlp_layernorm_output, w['mlp']['linear_fc1.weight'],
                      w['mlp']['linear_fc2.weight'])
  meki = _megatron_meki(pre_mlp_layernorm_output, input_ids, word_emb, w['meki_module'])
  return residual + (meki + mlp)


def _megatron_weights(p, cfg):
  """Our DecoderLayer params -> their state-dict layout (float64)."""
  p = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), p)
  d, heads, groups, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_group = heads // groups
  q = p['attn']['q']['kernel'].reshape(d, groups, per_group * hd)
  k, v = p['attn']['k']['kernel'], p['attn']['v']['kernel']  # [d, groups, hd]
  qkv = np.concatenate([q, k, v], axis=-1).reshape(d, -1).T  # rows: per group [q; k; v]
  fc1 = lambda tree: np.concatenate([tree['gate']['kernel'].T, tree['up']['kernel'].T])
  memory = p['meki']['memory']
  return {
      'self_attention': {'linear_qkv.layer_norm_weight': p['pre_attn_norm']['scale'],
                         'linear_qkv.weight': qkv,
                         'linear_proj.weight': p['attn']['o']['kernel'].reshape(-1, d).T},
      'pre_mlp_layernorm.weight': p['pre_ffn_norm']['scale'],
      'mlp': {'linear_fc1.weight': fc1(p['mlp']), 'linear_fc2.weight': p['mlp']['down']['kernel'].T},
      'meki_module': {
          'embeddings.weight': memory['memory_table'],
          'word_emb_projection': {
              'linear_fc1.layer_norm_weight': memory['projection_norm']['scale'],
              'linear_fc1.weight': fc1(memory['projection']),
              'linear_fc2.weight': memory['projection']['down']['kernel'].T},
          'alpha_scale': memory['alpha'], 'beta_scale': memory['beta'],
          'mix_norm.weight': memory['mix_norm']['scale'],
          'gate_proj.weight': p['meki']['gate']['kernel'].T,
          'out_proj.weight': p['meki']['out']['kernel'].T,
          'post_norm.weight': p['meki']['post_norm']['scale']}}


def _model_config(flavor='authors_release', **overrides):
  config = base.model_config(num_layers=4, d_model=64, num_heads=4, num_kv_heads=2, d_ff=96,
                             d_mem=16)
  config.update(vocab_size=101, head_dim=16, dtype='float32', remat_policy='none')
  base.apply_flavor(ml_collections.ConfigDict({'model': config}), flavor)
  config.update(overrides)
  return config


def _layer_params(layer, inputs, seed=0):
  """Random layer params: kernels and tables N(0, 0.3 / sqrt(fan-in)), gains and scalars
  around 1 (not 1, so every gain is exercised)."""
  abstract = nn.meta.unbox(jax.eval_shape(layer.init, jax.random.PRNGKey(0), *inputs)['params'])
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    if leaf.ndim <= 1:
      return jnp.asarray(rng.uniform(0.5, 1.5, leaf.shape), jnp.float32)
    return jnp.asarray(rng.normal(size=leaf.shape) / np.sqrt(leaf.shape[0]), jnp.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


EOD = 100  # an id of the tiny vocabulary that ends documents in the rows below


def _rows_of_several_documents(rng):
  """Two rows of 13 tokens as data.packing='stream' cuts them: documents end at the EODs, the
  first row starts mid-document; positions 0 .. 12 over each row, one segment per row."""
  token_ids = rng.integers(0, EOD, (2, 13))
  token_ids[0, [3, 8]] = EOD  # row 0: the tail of a document, a whole one, the head of a third
  token_ids[1, [5]] = EOD
  positions = np.broadcast_to(np.arange(13), token_ids.shape)
  return token_ids, positions, np.ones_like(token_ids)


@pytest.mark.parametrize('flavor, reset_positions, matches', [
    ('authors_release', False, True),
    ('paper', False, False),  # G without its input RMSNorm: another network
    ('authors_release', True, False),  # positions restarting per document: other rotations
])
def test_layer_equals_the_megatron_transcription(flavor, reset_positions, matches):
  """Rows holding several documents, absolute positions, causal attention across the row: our
  authors_release layer equals the transcription to 1e-5 relative in fp32. The paper flavor on
  the same weights, and our layer fed positions reset per document, show the check can fail."""
  release = ml_collections.FrozenConfigDict(_model_config('authors_release'))
  cfg = ml_collections.FrozenConfigDict(_model_config(flavor, qk_norm=False))
  rng = np.random.default_rng(1)
  token_ids, positions, segment_ids = _rows_of_several_documents(rng)
  if reset_positions:
    after_eod = np.concatenate([np.zeros((2, 1), bool), token_ids[:, :-1] == EOD], axis=1)
    starts = np.maximum.accumulate(np.where(after_eod, positions, 0), axis=1)
    positions = positions - starts
  embedding = rng.normal(size=(cfg.vocab_size, cfg.d_model))
  word_emb = embedding[token_ids]  # [b, s, h]
  hidden_states = rng.normal(size=token_ids.shape + (cfg.d_model,))  # the layer's input

  inputs = [jnp.asarray(a, dtype) for a, dtype in ((hidden_states, jnp.float32),
                                                   (token_ids, jnp.int32),
                                                   (word_emb, jnp.float32),
                                                   (positions, jnp.int32),
                                                   (segment_ids, jnp.int32))]
  params = _layer_params(DecoderLayer(release), inputs)
  ours, _ = DecoderLayer(cfg).apply({'params': params}, *inputs)

  theirs = _megatron_layer(hidden_states.transpose(1, 0, 2), token_ids,
                           word_emb.transpose(1, 0, 2), _megatron_weights(params, release),
                           release).transpose(1, 0, 2)
  relative = np.abs(np.asarray(ours, np.float64) - theirs).max() / np.abs(theirs).max()
  if matches:
    assert relative <= 1e-5, f'max |ours - theirs| / max |theirs| = {relative:.2e}'
  else:
    assert relative > 1e-2, relative


def _std_by_group(params):
  """{parameter path: std} of the initial kernels and tables (unboxed, scanned layout)."""
  return {'/'.join(k.key for k in path): float(np.std(np.asarray(leaf)))
          for path, leaf in jax.tree_util.tree_leaves_with_path(params)
          if path[-1].key not in GAINS}


@pytest.mark.parametrize('flavor', ['paper', 'authors_release'])
def test_init_statistics_follow_the_scaled_init_rule(flavor):
  """authors_release: N(0, 0.014) for M, W_gate, W_out, G's first linear and the rest of the
  backbone; N(0, 0.014 / sqrt(2 L)) for G's down projection and the backbone's attention-output
  and FFN-down projections (spec 6a point 3). paper: 0.014 everywhere."""
  config = base.model_config(num_layers=8, d_model=256, num_heads=2, num_kv_heads=1, d_ff=512,
                             d_mem=64)
  config.update(vocab_size=4096, dtype='float32', remat_policy='none')
  base.apply_flavor(ml_collections.ConfigDict({'model': config}), flavor)
  model = build_model(config)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 1), jnp.int32))['params'])
  scaled = 0.014 / np.sqrt(2 * 8) if flavor == 'authors_release' else 0.014
  expected = {'layers/attn/o/kernel': scaled, 'layers/mlp/down/kernel': scaled,
              'layers/meki/memory/projection/down/kernel': scaled}
  stds = _std_by_group(params)
  assert len(stds) == 14  # embed, q k v o, FFN x 3, M, G x 3, W_gate, W_out
  for name, std in stds.items():
    want = expected.get(name, 0.014)
    assert abs(std / want - 1) < 0.03, f'{name}: std {std:.5f}, expected {want:.5f}'
  gains = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
           if path[-1].key in GAINS]
  assert all(np.all(np.asarray(gain) == 1) for gain in gains)  # gains and scalars start at 1
  names = {'/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_leaves_with_path(params)}
  assert ('layers/meki/memory/projection_norm/scale' in names) == (flavor == 'authors_release')
  assert ('layers/attn/q_norm/scale' in names) == (flavor == 'paper')


def test_alpha_and_beta_are_decayed_only_in_the_release_flavor():
  params = {'layers': {'meki': {'memory': {'alpha': np.ones(2), 'beta': np.ones(2),
                                           'projection_norm': {'scale': np.ones((2, 4))},
                                           'memory_table': np.ones((2, 5, 4))}}}}
  paper, release = decay_mask(params, 'paper'), decay_mask(params, 'authors_release')
  memory = lambda mask: mask['layers']['meki']['memory']
  assert not memory(paper)['alpha'] and not memory(paper)['beta']
  assert memory(release)['alpha'] and memory(release)['beta']  # 0-d in Megatron: decayed
  for mask in (paper, release):  # gains (1-D in Megatron) never, tables always
    assert not memory(mask)['projection_norm']['scale'] and memory(mask)['memory_table']
  with pytest.raises(ValueError, match='model.flavor'):
    decay_mask(params, 'megatron')


@pytest.mark.parametrize('size, layers, d_model', [('1p7b', 28, 2048), ('0p6b', 28, 1024)])
def test_counts_and_flops_include_the_projection_gain(size, layers, d_model):
  """authors_release adds G's input gain [d_model] per layer (training-only: folded) and drops
  the q/k norms [head_dim] x 2 per layer from RAM; the FLOPs add 4 d per layer."""
  module = importlib.import_module(f'configs.meki_{size}')
  paper, release = module.get_config(), module.get_config('flavor=authors_release')
  counts = {name: count_params(config.model) for name, config in (('paper', paper),
                                                                  ('release', release))}
  assert counts['release']['train_params'] - counts['paper']['train_params'] == layers * d_model
  assert counts['paper']['ram_params'] - counts['release']['ram_params'] == layers * 2 * 128
  assert counts['release']['rom_params'] == counts['paper']['rom_params']
  flops = [forward_flops_per_token(config.model, 4096) for config in (paper, release)]
  assert flops[1] - flops[0] == layers * 4 * d_model
