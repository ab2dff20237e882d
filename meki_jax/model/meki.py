"""The MeKi branch of one layer, spec section 2, equations (1)-(6), in training and folded form.

Two flavors (`config.model.flavor`): `paper`, the equations of spec section 2, and
`authors_release`, the network of the authors' released Megatron code (spec section 6a): G
starts with an RMSNorm with a learned gain on E[x] (`projection_norm`, folded like the rest of
(1)-(3)) and G's down projection starts at std init_std / sqrt(2 L). In both the gate reads the
FFN's input RMSNorm(A) (spec 6a point 1).

Training form (`folded=False`):
    e = alpha * RMSNorm_mix(M[x] + beta * G(E[x]))        (1)-(3), submodule `memory`
Every operation of (1)-(3) acts on one token's rows, so `e` can be computed either per token
(`memory_mix='tokens'`: G runs on [batch, seq] rows of E) or per vocabulary row
(`'vocabulary'`: the step's fold M~ = alpha * RMSNorm_mix(M + beta * G(E)) on each device's
slice of the vocabulary, then M~[x] looked up). The second costs G on vocab_size rows instead of
batch * seq, and its gradient to E never passes through per-token [batch, seq, d] arrays; `auto`
takes it when a step has more tokens than the vocabulary has rows (the recipe: 1M against 151,680).
Folded form (`folded=True`), spec section 3:
    e = M~[x]                                              table `folded_memory`
Both continue with
    v = fuse(e, W_gate h)                                  (4)-(5)
    y = RMSNorm_post(W_out v)                              (6)
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from meki_jax.model.layers import Dense, RMSNorm, SwiGLU, lookup_rows, normal_init

MEMORIES = ('static', 'dynamic', 'both')
FUSIONS = {  # (e, gate pre-activation) -> v; 'add_sigmoid' is equation (5)
    'add_sigmoid': lambda e, g: e + nn.sigmoid(g),
    'mul_sigmoid': lambda e, g: e * nn.sigmoid(g),
    'add_silu': lambda e, g: e + nn.silu(g),
    'mul_silu': lambda e, g: e * nn.silu(g),
}
POSITIONS = ('parallel_ffn', 'parallel_attention', 'after_attention', 'after_ffn')
PROJECTIONS = ('swiglu', 'linear')
FLAVORS = ('paper', 'authors_release')
MEMORY_MIXES = ('auto', 'tokens', 'vocabulary')


def resolve_memory_mix(name, num_tokens, vocab_size):
  """config.model.memory_mix -> 'tokens' or 'vocabulary' for a batch of `num_tokens` ids."""
  if name == 'auto':
    return 'vocabulary' if num_tokens > vocab_size else 'tokens'
  return name


def authors_release(model_config):
  """Whether a config.model is the `authors_release` flavor (configs without one are `paper`)."""
  return model_config.get('flavor', 'paper') == 'authors_release'


def output_init_std(model_config):
  """The init std of output projections (attention `o`, FFN and G `down`).

  authors_release: Megatron's scaled init, init_std / sqrt(2 num_layers); paper: init_std.
  """
  if authors_release(model_config):
    return model_config.init_std / math.sqrt(2 * model_config.num_layers)
  return model_config.init_std


def gather_rows(table, token_ids):
  """table [vocab, width], token_ids [batch, seq] -> [batch, seq, width]."""
  rows = lookup_rows(table, token_ids)
  return nn.with_logical_constraint(rows, ('batch', 'length', 'mem'))


class MemoryMix(nn.Module):
  """Equations (1)-(3): the training-time memory vector e of one layer.

  Holds every parameter the fold removes: M (`memory_table`, [vocab, d_mem]), G (`projection`,
  and in the authors_release flavor its input RMSNorm `projection_norm` with a gain [d_model]),
  alpha, beta and the mix RMSNorm.
  """
  config: object  # FrozenConfigDict of config.model

  def setup(self):
    cfg, meki = self.config, self.config.meki
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    scalar = nn.with_logical_partitioning(nn.initializers.ones, ())
    self.uses_static = meki.memory in ('static', 'both')
    self.uses_dynamic = meki.memory in ('dynamic', 'both')
    if self.uses_static:
      self.memory_table = self.param('memory_table', normal_init(cfg.init_std, ('vocab', 'mem')),
                                     (cfg.vocab_size, meki.d_mem), dtypes['param_dtype'])
    self.normed_projection = self.uses_dynamic and authors_release(cfg)
    if self.normed_projection:  # Megatron's fused RMSNorm + first linear of G
      self.projection_norm = RMSNorm(axis='embed', eps=cfg.norm_eps, **dtypes)
    if self.uses_dynamic:
      if meki.projection == 'swiglu':  # G: d -> d/2 -> d_mem
        self.projection = SwiGLU(hidden=cfg.d_model // 2, out=meki.d_mem, out_axis='mem',
                                 std=cfg.init_std, out_std=output_init_std(cfg), **dtypes)
      else:
        self.projection = Dense(meki.d_mem, ('embed', 'mem'), std=cfg.init_std, **dtypes)
      self.beta = self.param('beta', scalar, (), dtypes['param_dtype'])
    self.alpha = self.param('alpha', scalar, (), dtypes['param_dtype'])
    self.mix_norm = RMSNorm(axis='mem', eps=cfg.norm_eps, **dtypes)

  def __call__(self, token_ids, embed_rows=None, embedding=None):
    """token_ids [batch, seq] -> e [batch, seq, d_mem] (compute dtype), from one of
    embed_rows = E_global[token_ids] [batch, seq, d]: (1)-(3) per token, or
    embedding = E_global [vocab, d] (compute dtype): (1)-(3) per vocabulary row, then looked up.
    """
    if embedding is None:
      static_rows = gather_rows(self.memory_table, token_ids) if self.uses_static else None
      return self.mix(static_rows, embed_rows)
    table = self.mix(self.memory_table if self.uses_static else None, embedding)
    table = nn.with_logical_constraint(table, ('vocab', 'mem'))  # [vocab, d_mem]
    # looked up in float32 so that the gradient's scatter-add over the batch sums in float32
    return gather_rows(table.astype(jnp.float32), token_ids).astype(table.dtype)

  def mix(self, static_rows, embed_rows):
    """Equation (3) from M rows [..., d_mem] and E rows [..., d]; either may be unused."""
    total = 0.0
    if self.uses_static:
      # (1) in the table's fp32: XLA hoisted a bf16 cast here out of the layer loop, as bf16
      # copies of every layer's table (65 MiB per device at 1.7B)
      total = static_rows
    if self.uses_dynamic:
      if self.normed_projection:
        embed_rows = self.projection_norm(embed_rows)
      total = total + self.beta * self.projection(embed_rows)  # (2)
    return self.alpha * self.mix_norm(total)  # (3)

  def fold_rows(self, vocab_start, embed_chunk):
    """M~ rows [vocab_start, vocab_start + chunk): embed_chunk [chunk, d] -> [chunk, d_mem]."""
    static_rows = None
    if self.uses_static:
      static_rows = jax.lax.dynamic_slice_in_dim(self.memory_table, vocab_start,
                                                 embed_chunk.shape[0], axis=0)
    return self.mix(static_rows, embed_chunk)


class MekiBranch(nn.Module):
  """One layer's MeKi branch: h [batch, seq, d_model] -> y [batch, seq, d_model].

  In the training form, (1)-(3) read `embed_rows` ([batch, seq, d_model]) or, per vocabulary
  row, `embedding` (E_global [vocab, d_model]; see MemoryMix). In the folded form `memory_rows`
  ([batch, seq, d_mem], rows of M~ fetched outside the model, e.g. from host memory) replaces the
  lookup of the `folded_memory` table.
  """
  config: object  # FrozenConfigDict of config.model
  folded: bool = False

  @nn.compact
  def __call__(self, hidden, token_ids, embed_rows, memory_rows=None, embedding=None):
    cfg, meki = self.config, self.config.meki
    dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    if not self.folded:
      memory = MemoryMix(cfg, name='memory')(token_ids, embed_rows, embedding)  # (1)-(3)
    elif memory_rows is None:
      table = self.param('folded_memory', normal_init(cfg.init_std, ('vocab', 'mem')),
                         (cfg.vocab_size, meki.d_mem), dtypes['param_dtype'])
      memory = gather_rows(table, token_ids)
    else:
      memory = nn.with_logical_constraint(memory_rows, ('batch', 'length', 'mem'))
    memory = memory.astype(dtypes['dtype'])  # e: [batch, seq, d_mem]
    gate = Dense(meki.d_mem, ('embed', 'mem'), std=cfg.init_std, name='gate', **dtypes)(hidden)
    fused = FUSIONS[meki.fusion](memory, gate)  # (4)-(5)
    out = Dense(cfg.d_model, ('mem', 'embed'), std=cfg.init_std, name='out',
                weight_grad_first=cfg.weight_grad_first, **dtypes)(fused)
    return RMSNorm(axis='embed', eps=cfg.norm_eps, name='post_norm', **dtypes)(out)  # (6)
