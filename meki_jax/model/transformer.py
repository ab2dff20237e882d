"""The Qwen3 decoder with a MeKi branch in every layer (spec sections 1 and 2, equations 7-8).

Layers run under `nn.scan`, so every layer parameter has a leading 'layers' axis:
params['layers']['mlp']['gate']['kernel'] is [num_layers, d_model, d_ff].
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from meki_jax.model.attention import Attention
from meki_jax.model.layers import RMSNorm, SwiGLU, normal_init
from meki_jax.model.meki import MekiBranch

REMAT_POLICIES = {  # config.model.remat_policy -> what the backward pass keeps
    'none': None,  # no remat: keep every activation
    'mlp': jax.checkpoint_policies.save_anything_except_these_names('mlp_hidden'),
    'full': jax.checkpoint_policies.nothing_saveable,
}


def meki_enabled(model_config):
  return bool(model_config.meki.enabled) and model_config.meki.d_mem > 0


class DecoderLayer(nn.Module):
  """x [batch, seq, d_model] -> x [batch, seq, d_model]; the scan carry is x."""
  config: object
  folded: bool = False

  @nn.compact
  def __call__(self, x, token_ids, embed_rows, positions, segment_ids, memory_rows=None):
    cfg = self.config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    norm = lambda name: RMSNorm(axis='embed', eps=cfg.norm_eps, name=name, **dtypes)
    meki_position = cfg.meki.position if meki_enabled(cfg) else None
    meki = lambda h: MekiBranch(cfg, self.folded, name='meki')(h, token_ids, embed_rows,
                                                                 memory_rows)

    attn_in = norm('pre_attn_norm')(x)
    attn = Attention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.qk_norm,
                     cfg.norm_eps, cfg.init_std, name='attn', **dtypes)(attn_in, positions,
                                                                         segment_ids)
    x = x + attn
    if meki_position == 'parallel_attention':
      x = x + meki(attn_in)
    elif meki_position == 'after_attention':
      x = x + meki(norm('pre_meki_norm')(x))
    x = nn.with_logical_constraint(x, ('batch', 'length', 'embed'))

    ffn_in = norm('pre_ffn_norm')(x)  # (7)
    ffn = SwiGLU(hidden=cfg.d_ff, out=cfg.d_model, std=cfg.init_std, name='mlp', **dtypes)
    x = x + ffn(ffn_in)
    if meki_position == 'parallel_ffn':
      x = x + meki(ffn_in)  # (8): H' = FFN(H) + MeKi(H) + A
    elif meki_position == 'after_ffn':
      x = x + meki(norm('pre_meki_norm')(x))
    return nn.with_logical_constraint(x, ('batch', 'length', 'embed')), None


class Transformer(nn.Module):
  """token_ids [batch, seq] -> logits [batch, seq, vocab] (float32).

  positions / segment_ids: [batch, seq]; default one document per row. `memory_rows`
  ([num_layers, batch, seq, d_mem], folded form only) supplies M~ rows fetched outside the model.
  """
  config: ml_collections.FrozenConfigDict  # config.model
  folded: bool = False

  @nn.compact
  def __call__(self, token_ids, positions=None, segment_ids=None, memory_rows=None):
    cfg = self.config
    dtype = jnp.dtype(cfg.dtype)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(token_ids)

    embed = nn.Embed(cfg.vocab_size, cfg.d_model, embedding_init=normal_init(
        cfg.init_std, ('vocab', 'embed')), param_dtype=jnp.dtype(cfg.param_dtype),
                     dtype=dtype, name='embed')
    embed_rows = nn.with_logical_constraint(embed(token_ids), ('batch', 'length', 'embed'))

    layer = DecoderLayer
    if REMAT_POLICIES[cfg.remat_policy] is not None:
      layer = nn.remat(layer, policy=REMAT_POLICIES[cfg.remat_policy], prevent_cse=False)
    layers = nn.scan(
        layer, variable_axes={'params': 0}, split_rngs={'params': True},
        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
        length=cfg.num_layers, metadata_params={nn.PARTITION_NAME: 'layers'})
    x, _ = layers(cfg, self.folded, name='layers')(
        embed_rows, token_ids, embed_rows, positions, segment_ids, memory_rows)

    x = RMSNorm(axis='embed', eps=cfg.norm_eps, dtype=dtype,
                param_dtype=jnp.dtype(cfg.param_dtype), name='final_norm')(x)
    logits = embed.attend(x).astype(jnp.float32)  # tied output projection: [batch, seq, vocab]
    return nn.with_logical_constraint(logits, ('batch', 'length', 'vocab'))


def build_model(model_config, folded=False):
  """The Transformer for a (possibly unfrozen) `config.model`."""
  return Transformer(ml_collections.FrozenConfigDict(model_config), folded=folded)


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
