"""Per-layer embeddings (PLE) as in Gemma 3n: the baseline of spec Table 2 with a token-indexed
table of L x d_ple values per token, read once per token for all layers.

Model level (`PerLayerInputs`, Gemma 3n's get_per_layer_inputs + project_per_layer_inputs), with
P the table [vocab, L * d_ple] and E_global the word embedding:
    p_t = sqrt(d_ple) * P[x_t]                                  reshaped [L, d_ple]
    q_t = RMSNorm(W_proj E_global[x_t])                         [L, d_ple], one norm for all layers
    u_t = (p_t + q_t) / sqrt(2)                                 u_{l,t}: layer l's input
Layer l, after its FFN (`PerLayerBranch`, Gemma 3n's per_layer_input_gate / per_layer_projection /
post_per_layer_input_norm), with x the residual stream there:
    x <- x + RMSNorm_post(W_up(gelu(W_gate x) * u_{l,t}))       W_gate: d -> d_ple, W_up: d_ple -> d

Gemma 3n scales W_proj's output by d_model^-0.5 because its word embedding is scaled by
sqrt(d_model); the Qwen3 embedding here is not, so the two factors cancel and neither appears.
Gemma 3n's activation is gelu with the tanh approximation. P is ROM (like MeKi's folded tables);
W_proj, the norms, W_gate and W_up are RAM. The table size matches MeKi's ROM when
d_ple = d_mem (L x V x d_ple values).
"""

import math

import flax.linen as nn
import jax.numpy as jnp

from meki_jax.model.layers import Dense, RMSNorm, lookup_rows, normal_init


def ple_enabled(model_config):
  """True when `config.model.ple` turns PLE on (configs without the section: off)."""
  return 'ple' in model_config and bool(model_config.ple.enabled)


class PerLayerInputs(nn.Module):
  """token_ids [batch, seq], embed_rows = E_global[token_ids] [batch, seq, d_model]
  -> every layer's input u [num_layers, batch, seq, d_ple] (layer-major, for `nn.scan`)."""
  config: object  # FrozenConfigDict of config.model

  @nn.compact
  def __call__(self, token_ids, embed_rows):
    cfg, d_ple = self.config, self.config.ple.d_ple
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    layers_by_width = (*token_ids.shape, cfg.num_layers, d_ple)
    table = self.param('per_layer_table', normal_init(cfg.init_std, ('vocab', 'ple')),
                       (cfg.vocab_size, cfg.num_layers * d_ple), dtypes['param_dtype'])
    rows = lookup_rows(table, token_ids)  # [batch, seq, L * d_ple]
    rows = nn.with_logical_constraint(rows, ('batch', 'length', 'ple'))
    rows = rows.astype(dtypes['dtype']).reshape(layers_by_width) * math.sqrt(d_ple)
    projected = Dense(cfg.num_layers * d_ple, ('embed', 'ple'), std=cfg.init_std,
                      name='projection', **dtypes)(embed_rows)  # [batch, seq, L * d_ple]
    projected = RMSNorm(axis='ple', eps=cfg.norm_eps, name='projection_norm', **dtypes)(
        projected.reshape(layers_by_width))  # [batch, seq, L, d_ple]
    inputs = (projected + rows) * 2 ** -0.5
    return inputs.transpose(2, 0, 1, 3)  # [L, batch, seq, d_ple]


class PerLayerBranch(nn.Module):
  """One layer's PLE branch: x [batch, seq, d_model] (the residual stream after the FFN) and
  this layer's input u [batch, seq, d_ple] -> the update to add to x, [batch, seq, d_model]."""
  config: object  # FrozenConfigDict of config.model

  @nn.compact
  def __call__(self, x, layer_input):
    cfg = self.config
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    gate = Dense(cfg.ple.d_ple, ('embed', 'ple'), std=cfg.init_std, name='gate', **dtypes)(x)
    gated = nn.gelu(gate, approximate=True) * layer_input.astype(dtypes['dtype'])  # [.., d_ple]
    out = Dense(cfg.d_model, ('ple', 'embed'), std=cfg.init_std, name='up', **dtypes)(gated)
    return RMSNorm(axis='embed', eps=cfg.norm_eps, name='post_norm', **dtypes)(out)
