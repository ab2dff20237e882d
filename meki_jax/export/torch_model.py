"""The folded MeKi inference graph in PyTorch, mirroring meki_jax/model (spec sections 1-3).

A Qwen3 decoder (RMSNorm, GQA with RoPE in the rotate-half layout, optional q/k RMSNorm, SwiGLU,
tied embeddings; both model flavors, `paper` and `authors_release`) whose MeKi branch takes the
rows of the folded tables M~ as an input: the caller gathers them by token id outside the graph,
the way a phone reads them from flash.

One forward serves prefill and decode. Shapes (b = batch, t = new tokens, S = cache slots,
L = layers, m = d_mem):
  token_ids [b, t] int64; positions [t] int64 (cache slots of the new tokens, shared by the
  batch); key_cache, value_cache [L, b, kv_heads, S, head_dim] float32; memory_rows
  [b, t, L, m] in the table dtype (absent for a dense model)
  -> logits [b, t, vocab] float32, key_cache, value_cache (new tensors: the graph is functional,
  which torch.export and ExecuTorch take as is).
A token attends to the slots <= its position. Parameter names follow Hugging Face's Qwen3
(`model.layers.0.self_attn.q_proj.weight`, ...) plus `model.layers.N.meki.*` for the branch;
`meki_jax/export/backbone.py` writes them. Imports neither jax nor flax.
"""

import torch
from torch import nn

FUSIONS = {  # (e, gate pre-activation) -> v; spec equation (5) and its variants
    'add_sigmoid': lambda e, g: e + torch.sigmoid(g),
    'mul_sigmoid': lambda e, g: e * torch.sigmoid(g),
    'add_silu': lambda e, g: e + nn.functional.silu(g),
    'mul_silu': lambda e, g: e * nn.functional.silu(g),
}
POSITIONS = ('parallel_ffn', 'parallel_attention', 'after_attention', 'after_ffn')
FLAVORS = ('paper', 'authors_release')


def meki_enabled(config):
  """Whether a model config (a dict, as in config.json) has the MeKi branch."""
  return bool(config['meki']['enabled']) and config['meki']['d_mem'] > 0


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * weight over the last axis, in float32."""

  def __init__(self, features, eps):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(features))
    self.eps = eps

  def forward(self, x):
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def linear(features_in, features_out):
  return nn.Linear(features_in, features_out, bias=False)


def rope_tables(positions, head_dim, theta):
  """positions [t] -> (cos, sin), each [t, head_dim]: the halves share their frequencies."""
  inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
  angles = positions.float()[:, None] * inv_freq  # [t, head_dim / 2]
  angles = torch.cat([angles, angles], dim=-1)
  return torch.cos(angles), torch.sin(angles)


def apply_rope(x, cos, sin):
  """x [b, heads, t, head_dim] rotated by the tables of `rope_tables`."""
  half = x.shape[-1] // 2
  first, second = x[..., :half], x[..., half:]  # slices: XNNPACK delegates them, not a split
  return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(nn.Module):
  """Qwen3 GQA over a KV cache passed in and out: x [b, t, d] -> ([b, t, d], keys, values
  [b, kv, S, hd]). export/device_model.py's CachedAttention keeps the cache inside instead."""

  def __init__(self, config):
    super().__init__()
    d, heads, kv_heads, head_dim = (config['d_model'], config['num_heads'],
                                    config['num_kv_heads'], config['head_dim'])
    self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
    self.q_proj = linear(d, heads * head_dim)
    self.k_proj = linear(d, kv_heads * head_dim)
    self.v_proj = linear(d, kv_heads * head_dim)
    self.o_proj = linear(heads * head_dim, d)
    if config['qk_norm']:  # per-head RMSNorm over head_dim, before RoPE (Qwen3)
      self.q_norm = RMSNorm(head_dim, config['norm_eps'])
      self.k_norm = RMSNorm(head_dim, config['norm_eps'])
    else:
      self.q_norm = self.k_norm = nn.Identity()

  def project(self, x):
    """x [b, t, d] -> q [b, t, heads, hd], k and v [b, t, kv_heads, hd] (q and k normed)."""
    b, t, _ = x.shape
    q = self.q_norm(self.q_proj(x).view(b, t, self.heads, self.head_dim))
    k = self.k_norm(self.k_proj(x).view(b, t, self.kv_heads, self.head_dim))
    return q, k, self.v_proj(x).view(b, t, self.kv_heads, self.head_dim)

  def forward(self, x, cos, sin, positions, keys, values):
    """cos, sin [t, hd] (rope_tables of `positions` [t]); keys, values [b, kv, S, hd]."""
    b, t, _ = x.shape
    group = self.heads // self.kv_heads
    q, k, v = (tensor.transpose(1, 2) for tensor in self.project(x))  # [b, heads | kv, t, hd]
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    keys = keys.index_copy(2, positions, k)  # [b, kv, S, hd]: slot = position
    values = values.index_copy(2, positions, v)
    # The `group` query heads of one kv head become rows of one product: [b * kv, group * t, hd]
    # against the kv head's keys, so no key or value is repeated per query head.
    slots = keys.shape[2]
    q = q.reshape(b * self.kv_heads, group * t, self.head_dim)
    scores = torch.bmm(q, keys.reshape(b * self.kv_heads, slots, self.head_dim).transpose(1, 2))
    allowed = (torch.arange(slots)[None, :] <= positions[:, None]).repeat(group, 1)  # [g*t, S]
    scores = (scores * self.head_dim ** -0.5).masked_fill(~allowed, torch.finfo(torch.float32).min)
    out = torch.bmm(torch.softmax(scores, dim=-1),
                    values.reshape(b * self.kv_heads, slots, self.head_dim))  # [b*kv, g*t, hd]
    out = out.reshape(b, self.heads, t, self.head_dim).transpose(1, 2).reshape(b, t, -1)
    return self.o_proj(out), keys, values


class SwiGLU(nn.Module):
  def __init__(self, d_model, d_ff):
    super().__init__()
    self.gate_proj = linear(d_model, d_ff)
    self.up_proj = linear(d_model, d_ff)
    self.down_proj = linear(d_ff, d_model)

  def forward(self, x):
    return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class MekiBranch(nn.Module):
  """Folded MeKi (spec section 3): y = RMSNorm_post(W_out fuse(M~[x], W_gate h)), eqs (4)-(6).

  With a position after attention or after the FFN the branch is its own residual sub-layer
  and normalises its input with `pre_norm` first.
  """

  def __init__(self, config):
    super().__init__()
    d, d_mem = config['d_model'], config['meki']['d_mem']
    self.fuse = FUSIONS[config['meki']['fusion']]
    if config['meki']['position'] in ('after_attention', 'after_ffn'):
      self.pre_norm = RMSNorm(d, config['norm_eps'])
    self.gate_proj = linear(d, d_mem)
    self.out_proj = linear(d_mem, d)
    self.post_norm = RMSNorm(d, config['norm_eps'])

  def forward(self, hidden, memory_rows):
    """hidden [b, t, d], memory_rows = e [b, t, m] -> [b, t, d]."""
    fused = self.fuse(memory_rows.float(), self.gate_proj(hidden))  # (4)-(5)
    return self.post_norm(self.out_proj(fused))  # (6)


class DecoderLayer(nn.Module):
  """Pre-norm attention and SwiGLU with the MeKi branch at `config.meki.position` (eqs 7-8)."""

  def __init__(self, config):
    super().__init__()
    d, eps = config['d_model'], config['norm_eps']
    self.input_layernorm = RMSNorm(d, eps)
    self.self_attn = Attention(config)
    self.post_attention_layernorm = RMSNorm(d, eps)
    self.mlp = SwiGLU(d, config['d_ff'])
    self.position = config['meki']['position'] if meki_enabled(config) else None
    if self.position is not None:
      self.meki = MekiBranch(config)

  def forward(self, x, memory_rows, *attention_inputs):
    """x [b, t, d], memory_rows [b, t, m] or None -> (x, *the attention's cache outputs).

    attention_inputs: what `self_attn` takes after its input (Attention: cos, sin, positions,
    keys, values; it returns the new keys and values).
    """
    attn_in = self.input_layernorm(x)
    attn, *cache = self.self_attn(attn_in, *attention_inputs)
    x = x + attn
    if self.position == 'parallel_attention':
      x = x + self.meki(attn_in, memory_rows)
    elif self.position == 'after_attention':
      x = x + self.meki(self.meki.pre_norm(x), memory_rows)
    ffn_in = self.post_attention_layernorm(x)  # (7)
    x = x + self.mlp(ffn_in)
    if self.position == 'parallel_ffn':  # (8): H' = FFN(H) + MeKi(H) + A
      x = x + self.meki(ffn_in, memory_rows)
    elif self.position == 'after_ffn':
      x = x + self.meki(self.meki.pre_norm(x), memory_rows)
    return (x, *cache)


class Backbone(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.embed_tokens = nn.Embedding(config['vocab_size'], config['d_model'])
    self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config['num_layers']))
    self.norm = RMSNorm(config['d_model'], config['norm_eps'])


class MekiForCausalLM(nn.Module):
  """The folded model: (token_ids, positions, key_cache, value_cache[, memory_rows]) ->
  (logits, key_cache, value_cache); see the module docstring for shapes."""

  def __init__(self, config):
    super().__init__()
    meki = config['meki']
    if meki_enabled(config) and (meki['position'] not in POSITIONS or
                                 meki['fusion'] not in FUSIONS):
      raise ValueError(f"model.meki.position={meki['position']!r} / model.meki.fusion="
                       f"{meki['fusion']!r} is not one of {POSITIONS} / {tuple(FUSIONS)}")
    flavor = config.get('flavor', 'paper')
    if flavor not in FLAVORS or (flavor == 'authors_release' and meki_enabled(config) and
                                 meki['position'] != 'parallel_ffn'):
      raise ValueError(f"model.flavor={flavor!r} with model.meki.position={meki['position']!r}: "
                       f"the flavor must be one of {FLAVORS}, authors_release with "
                       "'parallel_ffn'")
    self.config = config
    self.uses_memory = meki_enabled(config)
    self.model = Backbone(config)
    self.rope_theta = float(config['rope_theta'])

  def cache_shape(self, batch, cache_len):
    """The shape of key_cache and value_cache: [L, b, kv_heads, S, head_dim]."""
    c = self.config
    return (c['num_layers'], batch, c['num_kv_heads'], cache_len, c['head_dim'])

  def empty_cache(self, batch, cache_len):
    shape = self.cache_shape(batch, cache_len)
    return torch.zeros(shape), torch.zeros(shape)

  def forward(self, token_ids, positions, key_cache, value_cache, memory_rows=None):
    if (memory_rows is None) == self.uses_memory:
      raise ValueError('memory_rows are required for a MeKi model and absent for a dense one')
    x = self.model.embed_tokens(token_ids)  # [b, t, d]
    cos, sin = rope_tables(positions, self.config['head_dim'], self.rope_theta)  # [t, hd]
    keys, values = [], []
    for index, layer in enumerate(self.model.layers):
      rows = None if memory_rows is None else memory_rows[:, :, index]  # [b, t, m]
      x, layer_keys, layer_values = layer(x, rows, cos, sin, positions, key_cache[index],
                                          value_cache[index])
      keys.append(layer_keys)
      values.append(layer_values)
    x = self.model.norm(x)
    logits = torch.matmul(x, self.model.embed_tokens.weight.t())  # tied: [b, t, vocab]
    return logits, torch.stack(keys), torch.stack(values)
