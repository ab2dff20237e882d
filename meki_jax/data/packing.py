"""How documents become (input, target) pairs and packed rows: `data.packing`.

Every document is stored ending with EOD ([t1 .. tn, EOD], the token shard format).

'documents' (the paper's recipe, spec section 6): each document gives the pairs
inputs [t1 .. tn] -> targets [t2 .. tn, EOD], so no pair spans two documents. In a row each
document is its own segment (segment_ids 1, 2, ...: attention masked per document) and its
positions restart at 0; a document longer than the room left continues in the next row as a
new segment, again from position 0.

'stream' (megatron-core's GPTDataset, what the authors' released code trains; spec 6a point 6):
the documents are concatenated into one token stream and row i of seq_len L is the window
stream[i L : i L + L + 1] with inputs = window[:-1], targets = window[1:] (consecutive windows
share one token: the last target of a row is the first input of the next). Each EOD is an
input that later tokens attend to; a row is one segment (causal attention across its
documents) with positions 0 .. L - 1 over the whole row, so a document that starts mid-row sits
at shifted positions and sees the documents before it.

Both: loss_mask is 0 on padding and, with data.mask_eod_input (Megatron's --eod-mask-loss), where
the INPUT is EOD. Under 'documents' a document's final EOD is a target and never an input, so
only EODs inside a document are masked; under 'stream' every EOD input is (the pair
"EOD -> the next document's first token" exists there, without loss).
"""

import numpy as np

PACKINGS = ('documents', 'stream')


def document_pairs(token_ids):
  """'documents': [t1 .. tn, EOD] -> {'inputs': [t1 .. tn], 'targets': [t2 .. tn, EOD]}."""
  return {'inputs': token_ids[:-1], 'targets': token_ids[1:]}


def stream_pairs(index, token_ids, eod_id):
  """'stream': document `index` of a stream -> its pairs of the concatenated token stream.

  The token before document index > 0 is the previous document's final EOD, so its pairs are
  inputs [EOD, t1 .. tn] -> targets [t1 .. tn, EOD]; the stream's first document (index 0) has
  none before it: inputs [t1 .. tn] -> targets [t2 .. tn, EOD]. Raises ValueError for a
  document that does not end with `eod_id`.
  """
  if len(token_ids) == 0 or token_ids[-1] != eod_id:
    last = int(token_ids[-1]) if len(token_ids) else None
    raise ValueError(f'data.packing=stream: document {index} of the stream ends with token '
                     f'{last}, not data.eod_id={eod_id}; every document of a token shard ends '
                     'with EOD (rewrite the shards with tools/preprocess.py)')
  if index == 0:
    return document_pairs(token_ids)
  inputs = np.concatenate([np.asarray([eod_id], token_ids.dtype), token_ids[:-1]])
  return {'inputs': inputs, 'targets': token_ids}


def make_batch(packed, *, eod_id, mask_eod_input, packing):
  """Packed rows (grain's ConcatThenSplit output, [rows, seq_len] each) -> a training batch.

  Returns {'inputs', 'targets', 'segment_ids', 'positions'} int32 and 'loss_mask' float32, all
  [rows, seq_len]; padding (segment id 0) has position 0 and no loss.
  """
  segment_ids = packed['inputs_segment_ids']
  used = segment_ids > 0
  loss_mask = used & (packed['inputs'] != eod_id) if mask_eod_input else used
  positions = packed['inputs_positions']
  if packing == 'stream':  # one segment per row, positions counted from the row's start
    segment_ids = used
    positions = np.where(used, np.arange(used.shape[-1]), 0)
  return {'inputs': packed['inputs'].astype(np.int32),
          'targets': packed['targets'].astype(np.int32),
          'segment_ids': segment_ids.astype(np.int32),
          'positions': positions.astype(np.int32),
          'loss_mask': loss_mask.astype(np.float32)}
