"""Grouped-query self-attention with RoPE, optional q/k RMSNorm and a document-aware causal mask."""

import flax.linen as nn
import jax
import jax.numpy as jnp

from meki_jax.model.layers import Dense, RMSNorm
from meki_jax.model.rope import apply_rope


def document_causal_mask(segment_ids):
  """True where query t may attend to key s: s <= t and both in the same document.

  segment_ids: [batch, seq] (0 marks padding, which only attends to padding).
  Returns [batch, 1, 1, seq, seq] bool, broadcastable over (kv_heads, group).
  """
  seq = segment_ids.shape[-1]
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  same_document = segment_ids[:, :, None] == segment_ids[:, None, :]  # [batch, seq, seq]
  return (causal & same_document)[:, None, None]


class Attention(nn.Module):
  """Qwen3 GQA: x [batch, seq, d_model] -> [batch, seq, d_model]."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  qk_norm: bool
  norm_eps: float
  std: float
  dtype: jnp.dtype
  param_dtype: jnp.dtype

  @nn.compact
  def __call__(self, x, positions, segment_ids):
    kw = dict(std=self.std, dtype=self.dtype, param_dtype=self.param_dtype)
    q = Dense((self.num_heads, self.head_dim), ('embed', 'heads', 'head_dim'), name='q', **kw)(x)
    k = Dense((self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'head_dim'), name='k',
              **kw)(x)
    v = Dense((self.num_kv_heads, self.head_dim), ('embed', 'kv_heads', 'head_dim'), name='v',
              **kw)(x)
    if self.qk_norm:  # per-head RMSNorm over head_dim, before RoPE (Qwen3)
      norm = dict(axis='head_dim', eps=self.norm_eps, dtype=self.dtype,
                  param_dtype=self.param_dtype)
      q = RMSNorm(name='q_norm', **norm)(q)
      k = RMSNorm(name='k_norm', **norm)(k)
    q = apply_rope(q, positions, self.rope_theta)  # [batch, seq, heads, head_dim]
    k = apply_rope(k, positions, self.rope_theta)  # [batch, seq, kv_heads, head_dim]
    q = nn.with_logical_constraint(q, ('batch', 'length', 'heads', 'head_dim'))
    k = nn.with_logical_constraint(k, ('batch', 'length', 'kv_heads', 'head_dim'))
    v = nn.with_logical_constraint(v, ('batch', 'length', 'kv_heads', 'head_dim'))

    batch, seq = x.shape[:2]
    group = self.num_heads // self.num_kv_heads
    q = q.reshape(batch, seq, self.num_kv_heads, group, self.head_dim)
    scores = jnp.einsum('btkgh,bskh->bkgts', q, k,
                        preferred_element_type=jnp.float32) * self.head_dim ** -0.5
    scores = jnp.where(document_causal_mask(segment_ids), scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(self.dtype)  # [batch, kv, group, t, s]
    out = jnp.einsum('bkgts,bskh->btkgh', weights, v)
    out = out.reshape(batch, seq, self.num_heads, self.head_dim)
    return Dense(x.shape[-1], ('heads', 'head_dim', 'embed'), in_axes=2, name='o', **kw)(out)
