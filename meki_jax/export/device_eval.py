"""Held-out loss through the device programs: the quality of what ships.

  total, count = heldout_loss(session, batches)     # batches: the pipeline's eval batches

Every segment of a packed row (its tokens with one segment id) is run through the programs as
its own sequence from cache slot 0: one prefill call that returns every position's logits (a
device export with `logits='all'`), or a decode call for a one-token segment. Its positions must
be 0, 1, ... (per-document positions, or one segment per row with row positions): the programs
take a token's position from its cache slot. The loss is the mean over the targets whose
loss_mask is 1 of -log softmax(logits)[target], as the trainer's evaluation computes it.
Imports torch and numpy; not jax.
"""

import numpy as np
import torch

from meki_jax.export import memory_store


def segments(batch):
  """(inputs [n], targets [n], loss_mask [n]) of each segment of each row of a batch (numpy
  arrays [rows, seq] under the pipeline's keys); padding (segment id 0) is skipped."""
  for row in range(batch['inputs'].shape[0]):
    segment_ids = batch['segment_ids'][row]
    for segment in np.unique(segment_ids[segment_ids > 0]):
      where = np.nonzero(segment_ids == segment)[0]
      positions = batch['positions'][row][where]
      if not np.array_equal(positions, np.arange(len(where))):
        raise memory_store.ExportError(
            f'row {row} segment {segment} has positions {positions[:4].tolist()}...: the device '
            'programs number positions by cache slot from 0, so each segment must start at 0 '
            'and count up')
      yield (batch['inputs'][row][where], batch['targets'][row][where],
             batch['loss_mask'][row][where])


def heldout_loss(session, batches, max_tokens=None):
  """(sum of token losses, loss tokens) over `batches` through a device_runtime.Session whose
  prefill program returns every position's logits; stops after `max_tokens` loss tokens."""
  total, count = 0.0, 0
  for batch in batches:
    for inputs, targets, loss_mask in segments(batch):
      session.length = 0  # a new sequence: slots past its positions are never read
      token_ids = torch.from_numpy(inputs.astype(np.int64))[None]
      if len(inputs) == 1:
        logits = session.decode(token_ids[:, 0])[:, None]
      else:
        logits = session.prefill(token_ids)
      if logits.shape[1] != len(inputs):
        raise memory_store.ExportError(
            f'the prefill program returned logits for {logits.shape[1]} of {len(inputs)} '
            "positions: export the programs with --logits=all to evaluate them")
      log_probs = torch.log_softmax(logits[0].double(), dim=-1)  # [n, vocab]
      losses = -log_probs[torch.arange(len(inputs)), torch.from_numpy(targets.astype(np.int64))]
      mask = torch.from_numpy(loss_mask.astype(np.float64))
      total += float((losses * mask).sum())
      count += int(mask.sum())
    if max_tokens is not None and count >= max_tokens:
      break
  return total, count
