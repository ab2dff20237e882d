"""The Qwen3 decoder with a MeKi branch in every layer (spec sections 1 and 2, equations 7-8),
or one of the storage baselines of spec Table 2 (PLE, Engram; `ple.py`, `engram.py`).

`Transformer` (training, evaluation, the fold) runs its layers under `nn.scan`, so every layer
parameter has a leading 'layers' axis: params['layers']['mlp']['gate']['kernel'] is
[num_layers, d_model, d_ff]. `DecodeTransformer` is the same network with its layers unrolled
and a KV cache, for prefill and single-token steps; `unstack_layers` maps the first's
parameters to the second's.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from meki_jax.model.attention import Attention
from meki_jax.model.engram import EngramMemory, add_engram, engram_enabled, engram_slots
from meki_jax.model.layers import RMSNorm, SwiGLU, lookup_rows, normal_init
from meki_jax.model.meki import MekiBranch, output_init_std, resolve_memory_mix
from meki_jax.model.ple import PerLayerBranch, PerLayerInputs, ple_enabled
from meki_jax.model.remat import checkpoint_policy


def meki_enabled(model_config):
  return bool(model_config.meki.enabled) and model_config.meki.d_mem > 0


class DecoderLayer(nn.Module):
  """x [batch, seq, d_model] -> (x [batch, seq, d_model], cache); the scan carry is x.

  `cache` is this layer's KV cache (see attention.py) or None (training: returns None for it).
  `memory_rows` (folded form) is [batch, seq, d_mem] or a function hidden -> those rows, called
  where the MeKi branch needs them so that a host fetch overlaps with everything before.
  `ple_input` ([batch, seq, d_ple], this layer's PLE input) adds the PLE branch after the FFN;
  `engram` (EngramMemory's output, with this layer's `engram_slot`, -1 for none) adds Engram
  before the attention. `embedding` (E_global [vocab, d_model], compute dtype) replaces
  `embed_rows` (None then) when the MeKi branch mixes its memory per vocabulary row.
  In the authors_release flavor (spec 6a) the attention and FFN output projections start at
  Megatron's scaled std.
  """
  config: object
  folded: bool = False

  @nn.compact
  def __call__(self, x, token_ids, embed_rows, positions, segment_ids, memory_rows=None,
               cache=None, ple_input=None, engram_slot=None, engram=None, embedding=None):
    cfg = self.config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    norm = lambda name: RMSNorm(axis='embed', eps=cfg.norm_eps, name=name, **dtypes)
    meki_position = cfg.meki.position if meki_enabled(cfg) else None
    out_std = output_init_std(cfg)
    x = checkpoint_name(x, 'layer_input')  # what model.remat_offload may move to the host

    def meki(hidden):
      rows = memory_rows(hidden) if callable(memory_rows) else memory_rows
      return MekiBranch(cfg, self.folded, name='meki')(hidden, token_ids, embed_rows, rows,
                                                        embedding)

    if engram is not None:
      x = add_engram(x, engram_slot, engram, segment_ids, cfg)
    attn_in = norm('pre_attn_norm')(x)
    attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.qk_norm,
                     cfg.norm_eps, cfg.init_std, implementation=cfg.attention,
                     block=cfg.attention_block, name='attn', out_std=out_std, **dtypes)(
                         attn_in, positions, segment_ids, cache)
    if cache is not None:
      attn, cache = attn
    attn = checkpoint_name(attn, 'attn_out')
    x = x + attn
    if meki_position == 'parallel_attention':
      x = x + meki(attn_in)
    elif meki_position == 'after_attention':
      x = x + meki(norm('pre_meki_norm')(x))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    ffn_in = norm('pre_ffn_norm')(x)  # (7)
    # and the down projection when MeKi shares the FFN's output and the attention is kept: XLA
    # deferred its kernel gradient past the attention backward, keeping the FFN's hidden
    # (608 MiB at meki_4b); under 'full' the barrier costs memory instead (layers.py)
    down_first = meki_position == 'parallel_ffn' and cfg.remat_policy != 'full'
    ffn_first = ('gate', 'up', 'down') if down_first else ('gate', 'up')
    ffn = SwiGLU(hidden=cfg.d_ff, out=cfg.d_model, std=cfg.init_std, out_std=out_std,
                 name='mlp', weight_grad_first=ffn_first if cfg.weight_grad_first else (),
                 **dtypes)
    x = x + ffn(ffn_in)
    if meki_position == 'parallel_ffn':
      x = x + meki(ffn_in)  # (8): H' = FFN(H) + MeKi(H) + A
    elif meki_position == 'after_ffn':
      x = x + meki(norm('pre_meki_norm')(x))
    if ple_input is not None:
      x = x + PerLayerBranch(cfg, name='ple')(x, ple_input)
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), cache


def _embedding(cfg):
  """The word embedding E_global [vocab, d_model], also the tied output projection."""
  return nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=normal_init(
      cfg.init_std, ('vocab', 'embed')), param_dtype=jnp.dtype(cfg.param_dtype),
                  dtype=jnp.dtype(cfg.dtype), name='embed')


def _embed_rows(cfg, embed, token_ids):
  """E_global[token_ids]: [batch, seq] -> [batch, seq, d_model] in the compute dtype."""
  embed_rows = lookup_rows(embed.embedding, token_ids, cfg.dtype)
  return nn.with_logical_constraint(embed_rows, ('batch', 'length', 'embed'))


def _final_norm(cfg, x):
  """The final RMSNorm: x [..., d_model] -> [..., d_model] in the compute dtype."""
  return RMSNorm(axis='embed', eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype),
                 param_dtype=jnp.dtype(cfg.param_dtype), name='final_norm')(x)


def _logits(cfg, embed, x):
  """Final RMSNorm and the tied output projection: x [..., d_model] -> [..., vocab] float32."""
  return embed.attend(_final_norm(cfg, x)).astype(jnp.float32)


class Transformer(nn.Module):
  """token_ids [batch, seq] -> logits [batch, seq, vocab] (float32).

  positions / segment_ids: [batch, seq]; default one document per row. `memory_rows`
  ([num_layers, batch, seq, d_mem], folded form only) supplies M~ rows fetched outside the model.
  With `hidden_only` the output is the final-normed hidden state [batch, seq, d_model] (compute
  dtype) that the tied embedding projects to logits: the training loss does that projection
  in chunks (train/loss.py) so the whole logits tensor never exists.
  """
  config: ml_collections.FrozenConfigDict  # config.model
  folded: bool = False

  @nn.compact
  def __call__(self, token_ids, positions=None, segment_ids=None, memory_rows=None,
               hidden_only=False):
    cfg = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(token_ids)

    embed = _embedding(cfg)
    embed_rows = _embed_rows(cfg, embed, token_ids)
    branch_rows, embedding = embed_rows, None  # what the MeKi branches read (see meki.py)
    if (meki_enabled(cfg) and not self.folded
        and resolve_memory_mix(cfg.memory_mix, token_ids.size, cfg.vocab_size) == 'vocabulary'):
      branch_rows, embedding = None, embed.embedding.astype(jnp.dtype(cfg.dtype))
    ple_inputs = engram = slots = None
    if ple_enabled(cfg):
      ple_inputs = PerLayerInputs(cfg, name='ple')(token_ids, embed_rows)  # [L, b, s, d_ple]
    if engram_enabled(cfg):
      engram, slots = EngramMemory(cfg, name='engram')(token_ids, segment_ids), engram_slots(cfg)

    layer, policy = DecoderLayer, checkpoint_policy(cfg)
    if policy is not None:
      layer = nn.remat(layer, policy=policy, prevent_cse=False)
    layers = nn.scan(
        layer, variable_axes={'params': 0}, split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0, nn.broadcast, 0, 0,
                 nn.broadcast, nn.broadcast),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = layers(cfg, self.folded, name='layers')(
        embed_rows, token_ids, branch_rows, positions, segment_ids, memory_rows, None, ple_inputs,
        slots, engram, embedding)
    if hidden_only:
      return nn.with_logical_constraint(_final_norm(cfg, x), ('batch', 'length', 'embed'))
    logits = _logits(cfg, embed, x)  # [batch, seq, vocab]
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


class DecodeTransformer(nn.Module):
  """The Transformer with a KV cache: (token_ids, positions, cache) -> (logits, cache).

  token_ids, positions: [batch, seq]; row b's tokens are written at cache slots positions[b]
  (contiguous), and attend to slots <= their position. cache: one (key, value) per layer (see
  `attention.init_kv_cache`). Logits [batch, seq, vocab] float32, or None with
  `with_logits=False` (a prefill that only fills the cache). `memory_rows` (folded form):
  [num_layers, batch, seq, d_mem], or a function (layer, hidden) -> [batch, seq, d_mem].

  The layers are unrolled, each with its own parameters ('layer_0', ...; see `unstack_layers`)
  and cache buffer, so a step writes its cache slot in place and reads every weight once: under
  a scan XLA copies each layer's weight and cache slices every step (the layer stack alone,
  4 layers of the 0.6B shape, 10K cache, 2 CPU cores: 230 ms per step unrolled, 410 ms with the
  cache as scan carry, 690 ms with it scanned in and out).
  """
  config: ml_collections.FrozenConfigDict  # config.model
  folded: bool = False

  @nn.compact
  def __call__(self, token_ids, positions, cache, memory_rows=None, with_logits=True):
    cfg = self.config
    embed = _embedding(cfg)
    embed_rows = _embed_rows(cfg, embed, token_ids)
    x, new_cache = embed_rows, []
    for layer in range(cfg.num_layers):
      rows = memory_rows
      if callable(memory_rows):
        rows = functools.partial(memory_rows, layer)
      elif memory_rows is not None:
        rows = memory_rows[layer]
      x, layer_cache = DecoderLayer(cfg, self.folded, name=f'layer_{layer}')(
          x, token_ids, embed_rows, positions, None, rows, cache[layer])
      new_cache.append(layer_cache)
    return (_logits(cfg, embed, x) if with_logits else None), tuple(new_cache)


def build_model(model_config, folded=False, decode=False):
  """The Transformer (or with `decode`, the DecodeTransformer) for a `config.model`.

  Raises ValueError for a decode model with PLE or Engram: the KV-cache path has neither.
  """
  if decode and (ple_enabled(model_config) or engram_enabled(model_config)):
    raise ValueError('the decode model (KV cache) supports neither PLE nor Engram: '
                     f'model.ple.enabled={ple_enabled(model_config)}, '
                     f'model.engram.enabled={engram_enabled(model_config)}; evaluate these '
                     'baselines with the Transformer (build_model(..., decode=False))')
  module = DecodeTransformer if decode else Transformer
  return module(ml_collections.FrozenConfigDict(model_config), folded=folded)


def unstack_layers(params, num_layers):
  """Transformer params (unboxed) -> DecodeTransformer params: 'layers' [L, ...] -> 'layer_i'.

  Each layer's leaves become their own arrays; the other entries are shared, not copied.
  """
  layers = params['layers']
  unstacked = {key: value for key, value in params.items() if key != 'layers'}
  for layer in range(num_layers):
    unstacked[f'layer_{layer}'] = jax.tree_util.tree_map(lambda leaf: leaf[layer], layers)
  return unstacked


def check_token_ids(token_ids, vocab_size, where='token_ids'):
  """Raises ValueError naming the first id outside [0, vocab_size); call on host data.

  An out-of-range id would otherwise be silently clamped or filled with NaN by XLA's gather.
  """
  ids = np.asarray(token_ids)
  bad = np.argwhere((ids < 0) | (ids >= vocab_size))
  if bad.size:
    index = tuple(int(i) for i in bad[0])
    raise ValueError(f'{where}: token id {int(ids[index])} at index {index} is outside '
                     f'[0, model.vocab_size={vocab_size}) ({len(bad)} ids out of range)')
