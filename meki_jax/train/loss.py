"""Next-token cross-entropy over the tied output embedding, in chunks of the sequence.

The logits of a micro-batch at the recipe's shape are [tokens, 151,680] in fp32: 18.5 GiB per
chip at 8 x 4096 tokens per chip, as much again for their gradient. Here the
sequence is cut into chunks of `chunk_len` positions and a scan computes each chunk's logits,
log-sum-exp and target logit under `jax.checkpoint`: the forward keeps only each chunk's
input, the backward recomputes one chunk's logits at a time, so at most one chunk's logits
[batch, chunk_len, vocab] and their gradient exist at once. The embedding's gradient is
accumulated across chunks by the scan.
"""

import jax
import jax.numpy as jnp


def _chunk_loss_sum(hidden, embedding, targets, loss_mask):
  """Masked loss sum of one chunk: hidden [batch, c, d] (compute dtype), embedding
  [vocab, d] (compute dtype), targets [batch, c] int, loss_mask [batch, c] float -> scalar."""
  logits = jnp.einsum('bcd,vd->bcv', hidden, embedding, preferred_element_type=jnp.float32)
  log_normalizer = jax.nn.logsumexp(logits, axis=-1)  # [batch, c]
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((log_normalizer - target_logits) * loss_mask)


def chunked_loss_sum(hidden, embedding, targets, loss_mask, chunk_len):
  """Sum over positions of loss_mask * cross-entropy(hidden @ embedding.T, targets).

  hidden [batch, seq, d_model] (the final-normed hidden state, compute dtype); embedding
  [vocab, d_model] (the tied word embedding, any float dtype: cast to hidden's); targets
  [batch, seq] int; loss_mask [batch, seq] float. `chunk_len` positions per chunk (at most seq,
  must divide it; 0 = one chunk). Logits are computed in fp32 from compute-dtype operands.
  """
  seq = hidden.shape[1]
  chunk_len = seq if chunk_len <= 0 else min(chunk_len, seq)
  if seq % chunk_len:
    raise ValueError(f'loss: sequence length {seq} is not a multiple of '
                     f'model.loss_chunk_len={chunk_len}')
  embedding = embedding.astype(hidden.dtype)
  if chunk_len == seq:  # one chunk: the whole logits exist anyway, recomputing them saves nothing
    return _chunk_loss_sum(hidden, embedding, targets, loss_mask)
  chunk_loss = jax.checkpoint(_chunk_loss_sum)

  def split(x):  # [batch, seq, ...] -> [chunks, batch, chunk_len, ...]
    return jnp.moveaxis(x.reshape((x.shape[0], seq // chunk_len, chunk_len) + x.shape[2:]), 1, 0)

  def step(total, chunk):
    return total + chunk_loss(chunk[0], embedding, chunk[1], chunk[2]), None

  total, _ = jax.lax.scan(step, jnp.zeros((), jnp.float32),
                          (split(hidden), split(targets), split(loss_mask)))
  return total
