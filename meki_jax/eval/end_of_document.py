"""Does a trained model end documents? EOD probabilities at the true ends of held-out documents,
and greedy continuations of their last tokens that stop at EOD.

Batches are those of `data.pipeline.make_eval_dataset`: a document's end is a position t whose
target is EOD; its prompt is the document's tokens in that row up to t: from its segment's
start (data.packing='documents') or from the input after the row's last EOD before t ('stream',
whose rows hold the previous documents and their EODs too).
"""

import jax
import numpy as np

from meki_jax import decode


def document_ends(batch, eod_id):
  """[(row, start, t)] of the packed `batch`: targets[row, t] == EOD (a real pair), the
  document's tokens in that row starting at `start`: where its positions restart, or after an
  EOD input, whichever is later."""
  ends = []
  for row, t in zip(*np.nonzero((batch['targets'] == eod_id) & (batch['segment_ids'] > 0))):
    eod_inputs = np.flatnonzero(batch['inputs'][row, :t] == eod_id)
    start = max(t - int(batch['positions'][row, t]),
                int(eod_inputs[-1]) + 1 if eod_inputs.size else 0)
    ends.append((int(row), int(start), int(t)))
  return ends


def end_of_document_report(forward, decoder, batches, eod_id, *, max_documents, max_new_tokens):
  """{'documents', 'p_eod_at_end', 'p_eod_elsewhere', 'argmax_eod_at_end', 'stopped_at_eod'}.

  forward: (inputs, positions, segment_ids) -> logits [b, s, V]; decoder: (DecodeTransformer,
  decode params) for greedy generation. p_eod_* are mean probabilities of EOD at document ends
  and at the other loss-carrying positions; argmax_eod_at_end the share of ends where EOD is the
  greedy token; stopped_at_eod the share of greedy continuations of each end's prompt (its
  document's tokens in the row, the EOD excluded) that emit EOD within max_new_tokens.
  """
  at_end, elsewhere, argmax, prompts = [], [], [], []
  for batch in batches:
    logits = np.asarray(forward(batch['inputs'], batch['positions'], batch['segment_ids']))
    probs = np.asarray(jax.nn.softmax(logits, axis=-1)[..., eod_id])  # [b, s]
    ends = document_ends(batch, eod_id)
    end_mask = np.zeros(probs.shape, bool)
    for row, start, t in ends:
      end_mask[row, t] = True
      at_end.append(probs[row, t])
      argmax.append(int(np.argmax(logits[row, t])) == eod_id)
      prompts.append([int(x) for x in batch['inputs'][row, start:t + 1]])
    elsewhere.extend(probs[(batch['loss_mask'] > 0) & ~end_mask].tolist())
    if len(prompts) >= max_documents:
      break
  prompts, at_end, argmax = prompts[:max_documents], at_end[:max_documents], argmax[:max_documents]
  if not prompts:
    raise ValueError('the evaluation batches hold no document end (no EOD target)')
  outputs = decode.generate(*decoder, prompts, max_new_tokens=max_new_tokens, eod_id=eod_id)
  return {'documents': len(prompts), 'p_eod_at_end': float(np.mean(at_end)),
          'p_eod_elsewhere': float(np.mean(elsewhere)),
          'argmax_eod_at_end': float(np.mean(argmax)),
          'stopped_at_eod': float(np.mean([len(out) < max_new_tokens for out in outputs]))}
