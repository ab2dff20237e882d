"""The grain pipeline: token shards -> shuffled, packed, per-process batches.

Each document [t1 .. tn, EOD] becomes the pairs inputs [t1 .. tn] -> targets [t2 .. tn, EOD],
so no (input, target) pair ever spans two documents. Documents are concatenated and split
into rows of exactly `seq_len` (grain's ConcatThenSplitIterDataset): `segment_ids` number the
documents in a row from 1 (0 = padding), `positions` restart at 0 for each document, and a
document longer than the room left in a row continues in the next row as a new segment that
starts again at position 0. No token is dropped: the infinite training stream fills every row,
and the finite evaluation stream pads its unfinished last row and batch (its documented tail).
Mixture weights (data.train_sources' `weight`) are shares of documents, not of tokens.

Batches are dicts of numpy arrays [per_process_batch, seq_len]:
  inputs, targets (int32), segment_ids, positions (int32), loss_mask (float32).
loss_mask is 0 on padding and, with data.mask_eod_input (Megatron's --eod-mask-loss, spec
section 6), where the INPUT is the end-of-document token. The EOD that ends a document is a
target (the model learns to end a document) and never an input, so the pair "EOD -> the next
document's first token" that --eod-mask-loss removes is never formed; the switch masks the EOD
tokens that occur inside a document (e.g. a Megatron corpus whose documents hold several).
With data.attention_per_document=False (the authors' released code, spec section 6a point 6)
segment_ids are 1 on every token of a row (0 on padding), so attention is causal across the
documents of a row while positions still restart per document.
"""

import grain
import grain.experimental
import numpy as np
from absl import flags

from meki_jax.data.embedded import EMBEDDED_PREFIX, embedded_shards
from meki_jax.data.shards import decode_record, resolve_shards
from meki_jax.data.tokenizer import load_tokenizer

_EVAL_SPLIT_SEED = 20260203  # fixed: the held-out documents must not change with shuffle_seed


def source_paths(path, tokenizer_name):
  """A source's `path` (glob of shards or 'embedded:<name>') -> shard paths."""
  if path.startswith(EMBEDDED_PREFIX):
    return embedded_shards(path[len(EMBEDDED_PREFIX):], load_tokenizer(tokenizer_name))
  return resolve_shards(path)


def _open_shard(path):
  """One shard's records; fails naming the file if it is not a readable ArrayRecord file."""
  try:
    return grain.sources.ArrayRecordDataSource(path)  # reads the footer and the record count
  except (RuntimeError, OSError, ValueError) as error:  # array_record raises bare RuntimeErrors
    reason = str(error) or 'no readable footer'
    raise ValueError(f'token shard {path} is not a readable ArrayRecord file ({reason}): '
                     'truncated or corrupt? rewrite it with tools/preprocess.py') from error


class _Documents(grain.sources.RandomAccessDataSource):
  """Random access to the documents of some shards, optionally only those at `indices`.

  Each shard is opened on its own, so an unreadable file or record is named in the error.
  """

  def __init__(self, paths, indices=None):
    self._paths = list(paths)
    self._shards = [_open_shard(path) for path in self._paths]
    self._starts = np.cumsum([0] + [len(shard) for shard in self._shards])  # [shards + 1]
    self._indices = indices

  def __len__(self):
    return int(self._starts[-1]) if self._indices is None else len(self._indices)

  def __getitem__(self, index):
    document = index if self._indices is None else int(self._indices[index])
    shard = int(np.searchsorted(self._starts, document, side='right')) - 1
    record = document - int(self._starts[shard])
    where = f'record {record} of token shard {self._paths[shard]}'
    try:
      data = self._shards[shard][record]
    except (RuntimeError, OSError) as error:  # e.g. a checksum mismatch in a damaged file
      raise ValueError(f'cannot read {where}: {error}') from error
    return decode_record(data, where=where)

  def __repr__(self):
    return f'_Documents({self._paths}, {len(self)} documents)'


def split_indices(num_documents, eval_fraction):
  """(train, eval) document indices: a fixed pseudo-random `eval_fraction` is held out."""
  held_out = np.random.default_rng(_EVAL_SPLIT_SEED).random(num_documents) < eval_fraction
  return np.flatnonzero(~held_out), np.flatnonzero(held_out)


def _open_source(source, data_config, split):
  paths = source_paths(source['path'], data_config.tokenizer)
  documents = _Documents(paths)
  if split is None:
    return documents
  train, held_out = split_indices(len(documents), data_config.eval_fraction)
  return _Documents(paths, train if split == 'train' else held_out)


def _to_pairs(token_ids):
  return {'inputs': token_ids[:-1], 'targets': token_ids[1:]}


def _pad_rows(packed, batch_size):
  """Pads a short last batch with all-padding rows (segment id 0) up to `batch_size`."""
  missing = batch_size - len(packed['inputs'])
  if missing == 0:
    return packed
  return {key: np.pad(value, [(0, missing)] + [(0, 0)] * (value.ndim - 1))
          for key, value in packed.items()}


def _make_batch(packed, eod_id, mask_eod_input, attention_per_document):
  segment_ids = packed['inputs_segment_ids']
  loss_mask = segment_ids > 0
  if mask_eod_input:
    loss_mask &= packed['inputs'] != eod_id
  if not attention_per_document:
    segment_ids = (segment_ids > 0).astype(segment_ids.dtype)  # one segment per row
  return {'inputs': packed['inputs'].astype(np.int32),
          'targets': packed['targets'].astype(np.int32),
          'segment_ids': segment_ids.astype(np.int32),
          'positions': packed['inputs_positions'].astype(np.int32),
          'loss_mask': loss_mask.astype(np.float32)}


def _per_process_batch(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(f'train.global_batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes')
  return global_batch_size // process_count


def _pack_and_batch(documents, data_config, batch_size, drop_remainder):
  documents = documents.filter(lambda token_ids: len(token_ids) >= 2).map(_to_pairs)
  seq_len = data_config.seq_len
  packed = grain.experimental.ConcatThenSplitIterDataset(
      documents.to_iter_dataset(), length_struct={'inputs': seq_len, 'targets': seq_len})
  batches = packed.batch(batch_size, drop_remainder=drop_remainder)
  switches = (int(data_config.eod_id), bool(data_config.mask_eod_input),
              bool(data_config.attention_per_document))
  return batches.map(lambda b: _make_batch(_pad_rows(b, batch_size), *switches))


def make_train_dataset(data_config, *, global_batch_size, process_index=0, process_count=1,
                       seed=None):
  """An infinite grain IterDataset of this process' training batches.

  Every epoch is a fresh seeded shuffle of all training documents; process p of P takes
  documents p, p + P, ... of the (mixed) shuffled stream, so the processes' data are disjoint
  and together cover everything.
  """
  seed = data_config.shuffle_seed if seed is None else seed
  split = None if data_config.eval_sources else 'train'
  datasets, weights = [], []
  for number, source in enumerate(data_config.train_sources):
    opened = _open_source(source, data_config, split)
    if len(opened) == 0:
      total = len(_open_source(source, data_config, None)) if split else 0
      raise ValueError(f'data.train_sources[{number}] ({source["path"]}) holds no documents' + (
          f' left for training: data.eval_fraction={data_config.eval_fraction} holds out all '
          f'{total}' if total else ' (an empty corpus?)'))
    documents = grain.MapDataset.source(opened)
    datasets.append(documents.shuffle(seed=seed + number).repeat())
    weights.append(float(source.get('weight', 1.0)))
  if not datasets:
    raise ValueError('data.train_sources is empty')
  if any(weight <= 0 for weight in weights):
    raise ValueError(f'data.train_sources weights {weights} must all be positive')
  mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
  mine = mixed[process_index::process_count]
  batch_size = _per_process_batch(global_batch_size, process_count)
  batches = _pack_and_batch(mine, data_config, batch_size, drop_remainder=True)
  if data_config.num_workers > 0:
    if not flags.FLAGS.is_parsed():  # grain's workers read an absl flag (google/grain#1355)
      flags.FLAGS.mark_as_parsed()
    batches = batches.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers, per_worker_buffer_size=data_config.prefetch_buffer))
  return batches


def make_eval_dataset(data_config, *, global_batch_size, process_index=0, process_count=1):
  """A finite, deterministic IterDataset of held-out batches (the last one padded).

  Every process packs the whole (small) held-out stream into global batches and keeps its own
  rows of each, so the evaluation set and its packing do not depend on the process count:
  eval losses are comparable across topologies and across a resume on a different one.
  """
  if data_config.eval_sources:
    sources = [_open_source(source, data_config, None) for source in data_config.eval_sources]
  else:
    sources = [_open_source(source, data_config, 'eval') for source in data_config.train_sources]
  documents = grain.MapDataset.concatenate([grain.MapDataset.source(s) for s in sources])
  rows = _per_process_batch(global_batch_size, process_count)
  global_batches = _pack_and_batch(documents, data_config, global_batch_size,
                                   drop_remainder=False)
  mine = slice(process_index * rows, (process_index + 1) * rows)
  return global_batches.map(lambda batch: {key: value[mine] for key, value in batch.items()})
