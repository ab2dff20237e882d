"""Loss, gradients, gradient accumulation and the optimizer update: one global step.

The loss is the mean next-token cross-entropy over tokens whose loss_mask is 1. With
accumulation, the global batch [global_batch, seq] is split into grad_accum_steps micro-batches
whose summed (not averaged) losses and gradients are divided by the global token count once, so
k micro-batches give exactly the gradient of the one big batch.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from meki_jax.train.loss import chunked_loss_sum
from meki_jax.train.state import in_device_memory

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'loss_mask')


def loss_sums(params, model, batch):
  """(sum of masked token losses, number of loss tokens) for a batch [b, seq].

  The tied output projection and the cross-entropy run in chunks of model.loss_chunk_len
  positions (train/loss.py): the logits [b, seq, vocab] never exist whole.
  """
  hidden = model.apply({'params': params}, batch['inputs'], batch['positions'],
                       batch['segment_ids'], hidden_only=True)  # [b, seq, d_model]
  mask = batch['loss_mask']
  loss_sum = chunked_loss_sum(hidden, params['embed']['embedding'], batch['targets'], mask,
                              model.config.loss_chunk_len)
  return loss_sum, jnp.sum(mask)


def _grads_and_sums(params, model, batch, grad_accum_steps):
  grad_fn = jax.value_and_grad(lambda p, b: loss_sums(p, model, b), has_aux=True)
  if grad_accum_steps == 1:
    (loss_sum, count), grads = grad_fn(params, batch)
    return grads, loss_sum, count

  def split(x):  # [global, ...] -> [accum, micro, ...]
    micro = x.reshape((grad_accum_steps, x.shape[0] // grad_accum_steps) + x.shape[1:])
    return nn.with_logical_constraint(micro, (None, 'batch', 'length'))

  micro_batches = {key: split(batch[key]) for key in BATCH_KEYS}

  def accumulate(carry, micro_batch):
    grads, loss_sum, count = carry
    (micro_loss, micro_count), micro_grads = grad_fn(params, micro_batch)
    grads = jax.tree_util.tree_map(jnp.add, grads, micro_grads)
    return (grads, loss_sum + micro_loss, count + micro_count), None

  zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
  (grads, loss_sum, count), _ = jax.lax.scan(accumulate, (zeros, 0.0, 0.0), micro_batches)
  return grads, loss_sum, count


def train_step(state, batch, *, model, optimizer, schedule, grad_accum_steps):
  """One optimizer (global) step. Returns (new state, metrics).

  A state kept in host memory (train/state.py) is computed on in HBM: the parameters are
  streamed in for the forward pass, the optimizer state for the update.
  """
  params = in_device_memory(state.params)
  grads, loss_sum, count = _grads_and_sums(params, model, batch, grad_accum_steps)
  count = jnp.maximum(count, 1.0)
  grads = jax.tree_util.tree_map(lambda g: g / count, grads)
  updates, opt_state = optimizer.update(grads, in_device_memory(state.opt_state), params)
  params = optax.apply_updates(params, updates)
  metrics = {'loss': loss_sum / count, 'grad_norm': optax.tree.norm(grads),
             'learning_rate': schedule(state.step), 'loss_tokens': count}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch, *, model):
  """(sum of masked token losses, loss tokens) for one evaluation batch."""
  return loss_sums(in_device_memory(params), model, batch)
