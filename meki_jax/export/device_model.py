"""The module the on-device programs are exported from: the eager graph of torch_model made
shippable by named source transforms, each testable on its own against the eager model (as
ExecuTorch's LLM export does):

  DeviceModel          every layer's keys and values live in the module as buffers
                       [b, S, kv_heads, hd] (S = cache_len), written in place by ExecuTorch's
                       `llama::update_cache` and read by its `llama::custom_sdpa` (causal over
                       slots [0, start_pos + t), GQA without repeating keys; a one-token call
                       reads each slot once for all the query heads sharing it); the programs
                       keep them as mutable buffers, so no cache crosses a program boundary
  pooled_norms         every RMSNorm's mean of squares taken as a 4-D mean over the two
                       innermost axes, the form XNNPACK lowers (global average pooling), so a
                       norm no longer splits the delegated graph around a portable `mean`
  untie_output         the tied output projection as a Linear of its own (a copy of the
                       embedding), so it is quantized as a linear layer, as in HF's Qwen3
  quantize_linears     torchao 8da4w: int4 weights in groups of `group_size` input values,
                       int8 dynamic activations (what optimum-executorch's --qlinear 8da4w does)
  quantize_embedding   torchao 8w: int8 embedding rows, one scale each (--qembedding 8w)

DeviceModel.forward(token_ids [b, t] int64, start_pos [1] int64, *memory) -> logits
[b, t, vocab] (`logits='all'`) or [b, 1, vocab] (`'last'`, what generation needs), float32.
memory: the table scheme's inputs for the t tokens (table_quant: `memory_rows` [b, t, L, m], or
int8/int4 values with float16 scales, dequantized here); nothing for a dense model.
Imports torch (and torchao for the quantizers, executorch for its custom ops); not jax.
"""

import torch
from torch import nn

from meki_jax.export import torch_model

LOGITS = ('last', 'all')
QLINEAR = ('8da4w',)
QEMBEDDING = ('8w',)


def load_custom_ops():
  """Registers ExecuTorch's llama::update_cache and llama::custom_sdpa (their CPU kernels)."""
  from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401


class CachedAttention(nn.Module):
  """torch_model.Attention with its cache inside: x [b, t, d] -> [b, t, d].

  Keys and values of position p go to slot p of the buffers; a query at position p attends to
  slots <= p. The projections are the eager attention's modules.
  """

  def __init__(self, attention, batch, cache_len):
    super().__init__()
    self.attention = attention
    shape = (batch, cache_len, attention.kv_heads, attention.head_dim)
    self.register_buffer('k_cache', torch.zeros(shape))
    self.register_buffer('v_cache', torch.zeros(shape))

  def forward(self, x, cos, sin, start_pos):
    """cos, sin [t, 1, hd]; start_pos: an int, the position of x's first token."""
    b, t, _ = x.shape
    q, k, v = self.attention.project(x)  # [b, t, heads | kv, hd]
    q, k = torch_model.apply_rope(q, cos, sin), torch_model.apply_rope(k, cos, sin)
    torch.ops.llama.update_cache(k, self.k_cache, start_pos)  # in place: slots [p, p + t)
    torch.ops.llama.update_cache(v, self.v_cache, start_pos)
    if t == 1:
      return (self.attention.o_proj(self.decode_attention(q, start_pos)),)
    out = torch.ops.llama.custom_sdpa(q, self.k_cache, self.v_cache, start_pos, None, 0.0, True)
    return (self.attention.o_proj(out.reshape(b, t, -1)),)  # [b, t, d]

  def decode_attention(self, q, start_pos):
    """One token's attention, q [b, 1, heads, hd] -> [b, 1, heads * hd], reading each kv head's
    cache once for all the query heads that share it.

    custom_sdpa reads a kv head's slots once per query head. Here the `group` query heads of
    a kv head become `group` query rows of that kv head, attending without a causal mask to
    slots [0, start_pos] (custom_sdpa attends to start_pos' + rows slots, so start_pos' =
    start_pos + 1 - group): the same softmax over the same keys from 1/group of the reads
    (Qwen3: 2 query heads per kv head at 0.6B and 1.7B, 4 at 4B).
    """
    b, _, heads, hd = q.shape
    kv_heads = self.attention.kv_heads
    group = heads // kv_heads
    rows = q.reshape(b, kv_heads, group, hd).transpose(1, 2).contiguous()  # [b, group, kv, hd]
    out = torch.ops.llama.custom_sdpa(rows, self.k_cache, self.v_cache,
                                      start_pos + 1 - group, None, 0.0, False)
    return out.transpose(1, 2).reshape(b, 1, heads * hd)


class PooledRMSNorm(nn.Module):
  """torch_model.RMSNorm (its weight and eps) over x [..., features], the mean of squares
  computed on [b, rows, features, 1]: the same arithmetic in the one shape of `mean` that
  ExecuTorch's XNNPACK partitioner delegates."""

  def __init__(self, norm):
    super().__init__()
    self.weight, self.eps = norm.weight, norm.eps

  def forward(self, x):
    x = x.float()
    squares = (x * x).reshape(x.shape[0], -1, x.shape[-1], 1)  # [b, rows, features, 1]
    mean = squares.mean(dim=(2, 3), keepdim=True).reshape(*x.shape[:-1], 1)
    return x * torch.rsqrt(mean + self.eps) * self.weight


def dequantize_rows(scheme, memory):
  """The table scheme's program inputs -> float32 rows [b, t, L, m] (table_quant.decode)."""
  if not scheme.quantized:
    rows, = memory
    return rows.float()
  values, scales = memory  # [b, t, L, m | m/2], [b, t, L, scales per row]
  values = values.float()
  if scheme.name == 'int4':  # byte = (q_2i + 8) + 16 (q_2i+1 + 8); float ops lower everywhere
    high = torch.floor(values / 16)
    values = torch.stack([values - 16 * high, high], dim=-1).flatten(-2) - 8  # [b, t, L, m]
  groups = values.unflatten(-1, (scales.shape[-1], -1))  # [b, t, L, groups, group]
  return (groups * scales.float().unsqueeze(-1)).flatten(-2)


class DeviceModel(nn.Module):
  """The eager model with a KV cache per layer in buffers; see the module docstring."""

  def __init__(self, model, *, cache_len, batch=1, scheme=None, logits='last'):
    super().__init__()
    if logits not in LOGITS:
      raise ValueError(f'logits={logits!r} is not one of {LOGITS}')
    if model.uses_memory != (scheme is not None):
      raise ValueError('a MeKi model needs the table scheme of its memory export; a dense one '
                       'has none')
    load_custom_ops()
    self.config, self.scheme, self.logits = model.config, scheme, logits
    self.cache_len, self.rope_theta = cache_len, model.rope_theta
    self.model = model.model
    for layer in self.model.layers:
      layer.self_attn = CachedAttention(layer.self_attn, batch, cache_len)
    self.lm_head = None  # the embedding, transposed (tied), until `untie_output`

  def forward(self, token_ids, start_pos, *memory):
    t = token_ids.shape[1]
    position = start_pos[0].item()
    torch._check(position >= 0)
    torch._check(position + t <= self.cache_len)
    positions = start_pos + torch.arange(t)  # [t]
    cos, sin = torch_model.rope_tables(positions, self.config['head_dim'], self.rope_theta)
    cos, sin = cos[:, None], sin[:, None]  # [t, 1, hd]: broadcast over heads
    rows = dequantize_rows(self.scheme, memory) if self.scheme is not None else None
    x = self.model.embed_tokens(token_ids)  # [b, t, d]
    for index, layer in enumerate(self.model.layers):
      x, = layer(x, None if rows is None else rows[:, :, index], cos, sin, position)
    if self.logits == 'last':
      x = x[:, -1:]  # [b, 1, d]
    x = self.model.norm(x)
    if self.lm_head is None:
      return torch.matmul(x, self.model.embed_tokens.weight.t())  # [b, t | 1, vocab]
    return self.lm_head(x)


def pooled_norms(model):
  """Every torch_model.RMSNorm of `model` becomes a PooledRMSNorm holding its weight."""
  for name, module in list(model.named_modules()):
    if isinstance(module, torch_model.RMSNorm):
      owner, _, attribute = name.rpartition('.')
      setattr(model.get_submodule(owner), attribute, PooledRMSNorm(module))
  return model


def untie_output(model):
  """The output projection becomes a Linear holding a copy of the embedding."""
  weight = model.model.embed_tokens.weight
  model.lm_head = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
  model.lm_head.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
  return model


def quantize_linears(model, group_size):
  """torchao 8da4w on every Linear (optimum-executorch's --qlinear 8da4w with its default HQQ
  scale choice). Fails naming the layers whose input width `group_size` does not divide."""
  from torchao.quantization.granularity import PerGroup
  from torchao.quantization.quant_api import Int8DynamicActivationIntxWeightConfig, quantize_
  linears = {name: module.in_features for name, module in model.named_modules()
             if isinstance(module, nn.Linear)}
  misfits = {name: width for name, width in linears.items() if width % group_size}
  if misfits:
    raise ValueError(f'--group_size={group_size} does not divide the input width of '
                     f'{len(misfits)} linear layers, e.g. {dict(list(misfits.items())[:3])}')
  config = Int8DynamicActivationIntxWeightConfig(
      weight_dtype=torch.int4, weight_granularity=PerGroup(group_size),
      intx_choose_qparams_algorithm='hqq_scale_only')
  quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Linear))
  return model


def quantize_embedding(model):
  """torchao 8w on the embedding: int8 rows with a scale each (--qembedding 8w)."""
  from torchao.quantization.granularity import PerAxis
  from torchao.quantization.quant_api import IntxWeightOnlyConfig, quantize_
  config = IntxWeightOnlyConfig(weight_dtype=torch.int8, granularity=PerAxis(0),
                                intx_choose_qparams_algorithm='hqq_scale_only')
  quantize_(model, config, filter_fn=lambda module, _: isinstance(module, nn.Embedding))
  return model


def build_device_model(model, *, cache_len, batch=1, scheme=None, logits='last', qlinear=None,
                       group_size=32, qembedding=None):
  """The DeviceModel of an eager model, with the requested quantization applied.

  qlinear: None or '8da4w' (then the output projection is untied and quantized too);
  qembedding: None or '8w'. The eager model's modules are moved into the result.
  """
  if qlinear not in (None,) + QLINEAR or qembedding not in (None,) + QEMBEDDING:
    raise ValueError(f'qlinear={qlinear!r} / qembedding={qembedding!r}: expected one of '
                     f'{(None,) + QLINEAR} / {(None,) + QEMBEDDING}')
  device = pooled_norms(DeviceModel(model, cache_len=cache_len, batch=batch, scheme=scheme,
                                    logits=logits))
  if qlinear or qembedding:
    from torchao.utils import unwrap_tensor_subclass
    untie_output(device)
    if qembedding:
      quantize_embedding(device)
    if qlinear:
      quantize_linears(device, group_size)
    unwrap_tensor_subclass(device)
  return device.eval().requires_grad_(False)
