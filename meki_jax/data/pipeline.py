"""The grain pipeline: token shards -> shuffled, packed, per-process batches.

Documents are shuffled (reshuffled every epoch), mixed (data.train_sources' `weight`s are shares
of documents, not of tokens) and split between processes, then turned into (input, target)
pairs and packed into rows of exactly `seq_len` (grain's ConcatThenSplitIterDataset) as
`data.packing` says (packing.py: 'documents', one segment per document with positions reset, or
'stream', megatron-core's windows of the concatenated token stream). No token is dropped: the
infinite training stream fills every row, and the finite evaluation stream pads its unfinished
last row and batch (its documented tail).

Batches are dicts of numpy arrays [per_process_batch, seq_len]:
  inputs, targets (int32), segment_ids, positions (int32), loss_mask (float32).
"""

import functools

import grain
import grain.experimental
import numpy as np
from absl import flags

from meki_jax.data.embedded import EMBEDDED_PREFIX, embedded_shards
from meki_jax.data.packing import document_pairs, make_batch, stream_pairs
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


def _pad_rows(packed, batch_size):
  """Pads a short last batch with all-padding rows (segment id 0) up to `batch_size`."""
  missing = batch_size - len(packed['inputs'])
  if missing == 0:
    return packed
  return {key: np.pad(value, [(0, missing)] + [(0, 0)] * (value.ndim - 1))
          for key, value in packed.items()}


def _per_process_batch(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise ValueError(f'train.global_batch_size={global_batch_size} is not divisible by the '
                     f'{process_count} processes')
  return global_batch_size // process_count


def _to_pairs(documents, data_config):
  """A MapDataset of documents (token ids) -> one of (input, target) pairs, per data.packing."""
  if data_config.packing == 'stream':
    pairs = functools.partial(stream_pairs, eod_id=int(data_config.eod_id))
    return documents.map_with_index(pairs).filter(lambda pair: len(pair['inputs']) > 0)
  return documents.filter(lambda token_ids: len(token_ids) >= 2).map(document_pairs)


class _RestorablePacking(grain.IterDataset):
  """grain's ConcatThenSplitIterDataset whose iterator restores the states of grain's JSON
  checkpoints exactly.

  grain 0.2.18's iterator tells "no partly packed document" by comparing each of its state's
  `remainder_slices` with the tuple (-1, -1); a checkpoint stores the state as JSON, which
  returns the list [-1, -1], read back as a remainder of no tokens: the restored iterator skipped
  the next document (at 5 of the first 80 rows of tests/data's corpus). The slices are turned
  back into tuples before grain sees them.
  """

  def __init__(self, parent, length_struct):
    super().__init__(grain.experimental.ConcatThenSplitIterDataset(
        parent, length_struct=length_struct))

  def __iter__(self):
    return _RestorablePackingIterator(self._parent.__iter__())


class _RestorablePackingIterator(grain.DatasetIterator):

  def __next__(self):
    return next(self._parent)

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    slices = {key: tuple(value) for key, value in state['remainder_slices'].items()}
    self._parent.set_state({**state, 'remainder_slices': slices})


def _pack_and_batch(documents, data_config, batch_size, drop_remainder):
  seq_len = data_config.seq_len
  packed = _RestorablePacking(_to_pairs(documents, data_config).to_iter_dataset(),
                              length_struct={'inputs': seq_len, 'targets': seq_len})
  batches = packed.batch(batch_size, drop_remainder=drop_remainder)
  switches = dict(eod_id=int(data_config.eod_id), mask_eod_input=bool(data_config.mask_eod_input),
                  packing=data_config.packing)
  return batches.map(lambda b: make_batch(_pad_rows(b, batch_size), **switches))


def make_train_dataset(data_config, *, global_batch_size, process_index=0, process_count=1,
                       seed=None):
  """An infinite grain IterDataset of this process' training batches.

  Every epoch is a fresh seeded shuffle of all training documents; process p of P takes
  documents p, p + P, ... of the (mixed) shuffled stream, so the processes' data are disjoint
  and together cover everything. Under data.packing='stream' each process cuts its rows from
  the stream of its own documents.
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
