"""Engram (Cheng et al., DeepSeek, arXiv 2601.07372, "Conditional Memory via Scalable Lookup"):
hashed n-gram memory added to the residual stream at a few layers; a baseline of spec Table 2.

At Engram layer l (`config.model.engram.layers`), token t, token ids x, hidden state h:
    g_{n,t}   = (x_t m_0) XOR (x_{t-1} m_1) XOR ... XOR (x_{t-n+1} m_{n-1})   n in ngram_orders
    z_{n,k,t} = g_{n,t} mod p_{n,k}                                 hash head k < num_heads
    e_t       = concat_{n,k} T_l[offset_{n,k} + z_{n,k,t}]          [orders * heads * head_width]
    a_t       = sigmoid(ssqrt(RMSNorm(h_t) . RMSNorm(W_K e_t) / sqrt(d)))   ssqrt = sign * sqrt|.|
    u_t       = a_t W_V e_t                                         [d_model]
    y         = u + SiLU(Conv(RMSNorm(u)))     depthwise, causal, dilation = the largest order
    h        <- h + y                          before layer l's attention

As in the reference code (deepseek-ai/Engram engram_demo_v1.py, MaxText's engram.py): odd
multipliers m per layer drawn from `seed`, bounded so that x * m fits int32; distinct primes p
across all layers, orders and heads; the conv kernel starts at zero. Here each head owns
`rows_per_head` rows of T_l and hashes modulo the largest free prime <= rows_per_head (the few
rows above it stay unused), so the table size is a round number that shards over 'vocab'.
Packed rows: a token before the row or in another document counts as the id `vocab_size` (no
token has it), so no n-gram spans a document start, and the conv ignores other documents.
Deviations: no tokenizer compression (the model does not import the tokenizer; raw ids are
hashed), no biases (the Qwen3 backbone has none), one residual branch (no hyper-connections).

The token-only half (hashing, lookup, key, value) of every Engram layer runs once before the
layer scan (`EngramMemory`; deterministic addressing is what lets the paper prefetch it); the
half that needs h runs in layer l's scan step (`add_engram`). T_l is ROM; the rest is RAM.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meki_jax.model.layers import Dense, RMSNorm, lookup_rows, normal_init, rms_norm

LAYER_SEED_STRIDE = 10007  # the reference's per-layer seed offset


def engram_enabled(model_config):
  """True when `config.model.engram` turns Engram on (configs without the section: off)."""
  return 'engram' in model_config and bool(model_config.engram.enabled)


def _is_prime(n):
  if n < 2 or n % 2 == 0:
    return n == 2
  return all(n % factor for factor in range(3, math.isqrt(n) + 1, 2))


def hash_moduli(engram):
  """Distinct primes p [len(layers), len(ngram_orders) * num_heads], the largest <= rows_per_head.

  Raises ValueError when fewer primes than heads lie below rows_per_head.
  """
  count = len(engram.layers) * len(engram.ngram_orders) * engram.num_heads
  primes, candidate = [], engram.rows_per_head
  while len(primes) < count:
    if candidate < 2:
      raise ValueError(f'model.engram.rows_per_head={engram.rows_per_head} has {len(primes)} '
                       f'primes below it; {count} heads (layers x ngram_orders x num_heads) '
                       'need one each')
    if _is_prime(candidate):
      primes.append(candidate)
    candidate -= 1
  return np.array(primes, np.int32).reshape(len(engram.layers), -1)


def hash_multipliers(engram, layer, vocab_size):
  """Odd multipliers m_0 .. m_{N-1} of Engram layer `layer` (N = the largest order), [N] int32,
  small enough that id * m < 2^31 for every id <= vocab_size (the padding id)."""
  half_bound = max(1, np.iinfo(np.int32).max // (vocab_size + 1) // 2)
  rng = np.random.default_rng(engram.seed + LAYER_SEED_STRIDE * layer)
  return (rng.integers(0, half_bound, size=max(engram.ngram_orders)) * 2 + 1).astype(np.int32)


def _previous(values, segment_ids, shift, fill):
  """values [batch, seq, ...] moved `shift` positions later along seq; `fill` where position
  t - shift lies before the row or in another document than t."""
  if shift == 0:
    return values
  seq = values.shape[1]
  pad = [(0, 0), (shift, 0)] + [(0, 0)] * (values.ndim - 2)
  earlier = jnp.pad(values, pad)[:, :seq]
  earlier_segment = jnp.pad(segment_ids, [(0, 0), (shift, 0)], constant_values=-1)[:, :seq]
  same_document = (earlier_segment == segment_ids).reshape(
      segment_ids.shape + (1,) * (values.ndim - 2))
  return jnp.where(same_document, earlier, fill)


def ngram_hash_ids(token_ids, segment_ids, engram, multipliers, moduli, pad_id):
  """Rows of one layer's table for every (order, head): [batch, seq, orders * heads] int32.

  token_ids, segment_ids: [batch, seq]; multipliers [max order]; moduli [orders * heads].
  """
  token_ids = token_ids.astype(jnp.int32)
  mixed, per_order = None, {}
  for k in range(max(engram.ngram_orders)):  # g_{k+1} = g_k XOR x_{t-k} m_k
    term = _previous(token_ids, segment_ids, k, pad_id) * multipliers[k]
    mixed = term if mixed is None else jnp.bitwise_xor(mixed, term)
    per_order[k + 1] = mixed
  hashes = jnp.stack([per_order[n] for n in engram.ngram_orders], axis=-1)  # [b, s, orders]
  moduli = jnp.asarray(moduli).reshape(len(engram.ngram_orders), engram.num_heads)
  offsets = jnp.arange(moduli.size, dtype=jnp.int32).reshape(moduli.shape) * engram.rows_per_head
  rows = hashes[..., None] % moduli + offsets  # [batch, seq, orders, heads]
  return rows.reshape(*token_ids.shape, -1)


def causal_conv(x, kernel, dilation, segment_ids):
  """Depthwise causal convolution within documents: x [batch, seq, d], kernel [K, d] -> x's shape.

  out_t = sum_k kernel[k] * x_{t - k * dilation}, terms before the row or in another document
  dropped.
  """
  out = x * kernel[0]
  for k in range(1, kernel.shape[0]):
    out = out + _previous(x, segment_ids, k * dilation, 0) * kernel[k]
  return out


class EngramLayerMemory(nn.Module):
  """The token-only half of Engram layer `layer`: token_ids, segment_ids [batch, seq] -> dict of
  key = RMSNorm(W_K e), value = W_V e [batch, seq, d_model], and the parameters of the half in
  the layer: query_scale, conv_scale [d_model], conv_kernel [conv_kernel, d_model]."""
  config: object  # FrozenConfigDict of config.model
  layer: int
  moduli: tuple  # this layer's primes, [orders * heads]

  @nn.compact
  def __call__(self, token_ids, segment_ids):
    cfg, engram = self.config, self.config.engram
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    num_rows = len(self.moduli) * engram.rows_per_head
    table = self.param('ngram_table', normal_init(cfg.init_std, ('vocab', 'engram')),
                       (num_rows, engram.head_width), dtypes['param_dtype'])
    row_ids = ngram_hash_ids(token_ids, segment_ids, engram,
                             hash_multipliers(engram, self.layer, cfg.vocab_size),
                             np.asarray(self.moduli), pad_id=cfg.vocab_size)
    batch, seq, heads = row_ids.shape
    memory = lookup_rows(table, row_ids.reshape(batch, seq * heads))  # [b, s * heads, width]
    memory = memory.reshape(batch, seq, heads * engram.head_width).astype(dtypes['dtype'])
    memory = nn.with_logical_constraint(memory, ('batch', 'length', 'engram'))  # e
    dense = lambda name: Dense(cfg.d_model, ('engram', 'embed'), std=cfg.init_std, name=name,
                               **dtypes)
    key = RMSNorm(axis='embed', eps=cfg.norm_eps, name='key_norm', **dtypes)(
        dense('key')(memory))
    ones = nn.with_logical_partitioning(nn.initializers.ones, ('embed',))
    zeros = nn.with_logical_partitioning(nn.initializers.zeros, (None, 'embed'))
    return dict(
        key=key, value=dense('value')(memory),
        query_scale=self.param('query_norm_scale', ones, (cfg.d_model,), dtypes['param_dtype']),
        conv_scale=self.param('conv_norm_scale', ones, (cfg.d_model,), dtypes['param_dtype']),
        conv_kernel=self.param('conv_kernel', zeros, (engram.conv_kernel, cfg.d_model),
                               dtypes['param_dtype']))


class EngramMemory(nn.Module):
  """Every Engram layer's token-only half, stacked: token_ids, segment_ids [batch, seq] -> the
  dict of `EngramLayerMemory` with a leading axis [len(engram.layers), ...]."""
  config: object  # FrozenConfigDict of config.model

  @nn.compact
  def __call__(self, token_ids, segment_ids):
    engram = self.config.engram
    moduli = hash_moduli(engram)
    parts = [EngramLayerMemory(self.config, layer, tuple(int(p) for p in moduli[index]),
                               name=f'layer_{layer}')(token_ids, segment_ids)
             for index, layer in enumerate(engram.layers)]
    return jax.tree_util.tree_map(lambda *arrays: jnp.stack(arrays), *parts)


def engram_slots(model_config):
  """[num_layers] int32: each layer's index into `EngramMemory`'s output, -1 without Engram."""
  slots = np.full(model_config.num_layers, -1, np.int32)
  slots[list(model_config.engram.layers)] = np.arange(len(model_config.engram.layers))
  return jnp.asarray(slots)


def add_engram(hidden, slot, memory, segment_ids, model_config):
  """hidden [batch, seq, d_model] + y of Engram layer `slot` of `memory` (EngramMemory's output);
  hidden unchanged when slot is -1. segment_ids: [batch, seq]."""
  engram, eps = model_config.engram, model_config.norm_eps

  def with_engram(hidden):
    layer = jax.tree_util.tree_map(lambda stacked: stacked[slot], memory)
    query = rms_norm(hidden, layer['query_scale'], eps, jnp.float32)
    score = jnp.sum(query * layer['key'].astype(jnp.float32), axis=-1, keepdims=True)
    score = score / math.sqrt(hidden.shape[-1])  # [batch, seq, 1]
    score = jnp.sign(score) * jnp.sqrt(jnp.maximum(jnp.abs(score), 1e-6))
    gated = (nn.sigmoid(score) * layer['value']).astype(hidden.dtype)  # u: [batch, seq, d]
    conv = causal_conv(rms_norm(gated, layer['conv_scale'], eps, hidden.dtype),
                       layer['conv_kernel'].astype(hidden.dtype), max(engram.ngram_orders),
                       segment_ids)
    return hidden + gated + nn.silu(conv)

  return jax.lax.cond(slot >= 0, with_engram, lambda hidden: hidden, hidden)
