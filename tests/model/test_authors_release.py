"""The authors_release flavor (spec section 6a) against a numpy transcription of the MeKi layer of
the authors' released Megatron-LM code (github ningding-o/MeKi, Transformer Engine layer spec),
and its init, weight decay, parameter count and FLOPs.

The transcription follows their modules, not ours: sequence-first activations [s, b, h]; nn.Linear
weights [out, in]; the fused RMSNorm + first linear of TE (`TELayerNormColumnParallelLinear`) for
the QKV projection, the FFN and MeKi's projection G (a Megatron MLP whose fc1 holds [gate; up]);
an identity `pre_mlp_layernorm`, so MeKi (their class `MeKi`) gets the raw residual; the QKV
weight interleaved per query group [q heads of the group; k; v]; rotate-half RoPE; TE's causal
mask (no document mask) with position ids reset per document.
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

EPS = 1e-6
GAINS = ('scale', 'alpha', 'beta')  # RMSNorm gains and MeKi's scalars: initialised to 1


def _rms(x, weight):  # TE RMSNorm (zero_centered_gamma off)
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + EPS) * weight


def _silu(x):
  return x / (1 + np.exp(-x))


def _rotary(x, positions, base_theta):
  """x [s, b, heads, hd] rotated with Megatron's rotary embedding (rotate_half, halves share)."""
  dim = x.shape[-1]
  inv_freq = 1.0 / base_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  freqs = positions.T[:, :, None] * inv_freq  # [s, b, dim / 2]
  emb = np.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
  x1, x2 = x[..., :dim // 2], x[..., dim // 2:]
  return x * np.cos(emb) + np.concatenate([-x2, x1], axis=-1) * np.sin(emb)


def _megatron_mlp(x, w):
  """Megatron MLP, TE spec: fc1 = RMSNorm(x) @ [gate; up].T, swiglu, fc2."""
  fc1 = _rms(x, w['linear_fc1.layer_norm_weight']) @ w['linear_fc1.weight'].T
  gate, up = np.split(fc1, 2, axis=-1)
  return (_silu(gate) * up) @ w['linear_fc2.weight'].T


def _megatron_meki(hidden_states, input_ids, word_emb, w):
  """Their MeKi.forward: hidden_states, word_emb [s, b, h]; input_ids [b, s] -> [s, b, h]."""
  static = w['embeddings.weight'][input_ids].transpose(1, 0, 2)  # [s, b, m]
  dynamic = _megatron_mlp(word_emb, w['word_emb_projection'])
  memory = _rms(static + dynamic * w['beta_scale'], w['mix_norm.weight']) * w['alpha_scale']
  gate = hidden_states @ w['gate_proj.weight'].T
  fused = 1 / (1 + np.exp(-gate)) + memory
  return _rms(fused @ w['out_proj.weight'].T, w['post_norm.weight'])


def _megatron_layer(residual, input_ids, word_emb, position_ids, w, cfg):
  """TransformerLayer.forward with the MeKi patch: residual [s, b, h] -> [s, b, h]."""
  s, b, _ = residual.shape
  heads, groups, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_group = heads // groups
  attn = w['self_attention']
  qkv = _rms(residual, attn['linear_qkv.layer_norm_weight']) @ attn['linear_qkv.weight'].T
  qkv = qkv.reshape(s, b, groups, (per_group + 2) * hd)
  q = qkv[..., :per_group * hd].reshape(s, b, heads, hd)
  k = qkv[..., per_group * hd:(per_group + 1) * hd]  # [s, b, groups, hd]
  v = qkv[..., (per_group + 1) * hd:]
  q, k = _rotary(q, position_ids, cfg.rope_theta), _rotary(k, position_ids, cfg.rope_theta)
  k, v = np.repeat(k, per_group, axis=2), np.repeat(v, per_group, axis=2)  # head i -> group i//g
  scores = np.einsum('sbnd,tbnd->bnst', q, k) / np.sqrt(hd)
  scores = np.where(np.tril(np.ones((s, s), bool)), scores, -np.inf)  # TE causal mask only
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  context = np.einsum('bnst,tbnd->sbnd', probs, v).reshape(s, b, heads * hd)
  hidden = residual + context @ attn['linear_proj.weight'].T
  pre_mlp_layernorm_output = hidden  # IdentityOp in the TE spec: the norm is fused into fc1
  mlp = _megatron_mlp(pre_mlp_layernorm_output, w['mlp'])
  meki = _megatron_meki(pre_mlp_layernorm_output, input_ids, word_emb, w['meki_module'])
  return hidden + (meki + mlp)


def _megatron_weights(p, cfg):
  """Our DecoderLayer params -> their state-dict layout (float64)."""
  p = jax.tree_util.tree_map(lambda leaf: np.asarray(leaf, np.float64), p)
  d, heads, groups, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  per_group = heads // groups
  q = p['attn']['q']['kernel'].reshape(d, groups, per_group * hd)
  k, v = p['attn']['k']['kernel'], p['attn']['v']['kernel']  # [d, groups, hd]
  qkv = np.concatenate([q, k, v], axis=-1).reshape(d, -1).T  # rows: per group [q; k; v]
  mlp = lambda tree, norm: {'linear_fc1.layer_norm_weight': norm,
                            'linear_fc1.weight': np.concatenate([tree['gate']['kernel'].T,
                                                                 tree['up']['kernel'].T]),
                            'linear_fc2.weight': tree['down']['kernel'].T}
  memory = p['meki']['memory']
  return {
      'self_attention': {'linear_qkv.layer_norm_weight': p['pre_attn_norm']['scale'],
                         'linear_qkv.weight': qkv,
                         'linear_proj.weight': p['attn']['o']['kernel'].reshape(-1, d).T},
      'mlp': mlp(p['mlp'], p['pre_ffn_norm']['scale']),
      'meki_module': {
          'embeddings.weight': memory['memory_table'],
          'word_emb_projection': mlp(memory['projection'], memory['projection_norm']['scale']),
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


@pytest.mark.parametrize('flavor, matches', [('authors_release', True), ('paper', False)])
def test_layer_equals_the_megatron_transcription(flavor, matches):
  """Two packed documents per row: positions reset, attention causal across the row. The paper
  flavor (without q/k norm, the same weights) shows the comparison can fail."""
  release = ml_collections.FrozenConfigDict(_model_config('authors_release'))
  cfg = ml_collections.FrozenConfigDict(_model_config(flavor, qk_norm=False))
  rng = np.random.default_rng(1)
  batch, seq = 2, 11
  token_ids = rng.integers(0, cfg.vocab_size, (batch, seq))
  positions = np.array([list(range(6)) + list(range(5)), list(range(4)) + list(range(7))])
  segment_ids = np.ones((batch, seq), np.int32)  # data.attention_per_document=False
  embedding = rng.normal(size=(cfg.vocab_size, cfg.d_model))
  word_emb = embedding[token_ids]  # [b, s, h]
  residual = rng.normal(size=(batch, seq, cfg.d_model))  # the layer's input

  inputs = [jnp.asarray(a, dtype) for a, dtype in ((residual, jnp.float32),
                                                   (token_ids, jnp.int32),
                                                   (word_emb, jnp.float32),
                                                   (positions, jnp.int32),
                                                   (segment_ids, jnp.int32))]
  params = _layer_params(DecoderLayer(release), inputs)
  ours, _ = DecoderLayer(cfg).apply({'params': params}, *inputs)

  theirs = _megatron_layer(residual.transpose(1, 0, 2), token_ids, word_emb.transpose(1, 0, 2),
                           positions, _megatron_weights(params, release), release)
  theirs = theirs.transpose(1, 0, 2)
  error = np.abs(np.asarray(ours, np.float64) - theirs).max()
  if matches:
    assert error <= 1e-5 * max(1.0, np.abs(theirs).max()), f'max |ours - theirs| = {error:.2e}'
  else:  # the paper's equations (gate on RMSNorm(A)) are a different network
    assert error > 1e-2, error


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
