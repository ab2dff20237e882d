"""The grain pipeline on small synthetic shards: packing, loss mask, process split, resume, mix,
for both data.packing modes ('documents' and megatron-core's 'stream').

Document n's tokens are n * 1000 + [0, 1, ...] followed by EOD, so every id says which
document and position it came from, and a stream of batches can be checked pair by pair.
"""

import json
import os

import numpy as np
import pytest

from configs import base
from meki_jax.data import pipeline
from meki_jax.data.shards import ShardWriter

EOD = base.QWEN3_EOD_ID
SEQ_LEN = 16
GLOBAL_BATCH = 4


def _document(number, length):
  """[number * 1000 + 0, ..., number * 1000 + length - 2, EOD]."""
  return np.array([number * 1000 + i for i in range(length - 1)] + [EOD], np.int64)


def _write_shards(directory, numbers_per_shard, seed=0):
  """Writes one shard per list of document numbers (random lengths 2..40). Returns {n: doc}."""
  rng = np.random.default_rng(seed)
  documents = {}
  os.makedirs(directory, exist_ok=True)
  for shard, numbers in enumerate(numbers_per_shard):
    with ShardWriter(os.path.join(directory, f'docs-{shard}.array_record')) as writer:
      for number in numbers:
        documents[number] = _document(number, int(rng.integers(2, 41)))
        writer.write(documents[number])
  return documents


@pytest.fixture
def corpus(tmp_path):
  """(glob, {number: document}): 30 documents in 2 shards."""
  documents = _write_shards(tmp_path, [range(1, 16), range(16, 31)])
  return str(tmp_path / '*.array_record'), documents


def _data_config(*paths_and_weights, **overrides):
  config = base.get_config().data
  config.seq_len = SEQ_LEN
  config.train_sources = [dict(path=path, weight=weight) for path, weight in paths_and_weights]
  config.eval_fraction = 0.0  # train on every document unless a test holds some out
  config.update(overrides)
  return config


def _take(dataset, count):
  iterator = iter(dataset)
  return [next(iterator) for _ in range(count)]


def _pairs(batches):
  """(inputs, targets) of the non-padding positions, in stream order [pairs]."""
  inputs = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in batches])
  targets = np.concatenate([b['targets'][b['segment_ids'] > 0] for b in batches])
  return inputs, targets


def _stream_documents(batches, documents):
  """Document numbers in stream order; asserts each one appears whole, pair after pair.

  A document cut off by the end of `batches` is not counted.
  """
  inputs, targets = _pairs(batches)
  numbers, position = [], 0
  while position < len(inputs):
    assert inputs[position] % 1000 == 0, f'pair {position} does not start a document'
    number = int(inputs[position] // 1000)
    pairs = len(documents[number]) - 1
    if position + pairs > len(inputs):
      break
    np.testing.assert_array_equal(inputs[position:position + pairs], documents[number][:-1])
    np.testing.assert_array_equal(targets[position:position + pairs], documents[number][1:])
    numbers.append(number)
    position += pairs
  return numbers


def _token_stream(batches):
  """'stream' rows in order -> the token stream they are windows of; asserts that each row's
  targets are its inputs shifted by one token, continued by the next row's first input."""
  inputs = np.concatenate([b['inputs'][b['segment_ids'] > 0] for b in batches])
  targets = np.concatenate([b['targets'][b['segment_ids'] > 0] for b in batches])
  np.testing.assert_array_equal(targets[:-1], inputs[1:])
  return np.append(inputs, targets[-1])


def _stream_numbers(stream, documents):
  """Document numbers of a token stream in order; asserts that each is whole, its EOD included
  (a document cut off by the end of the stream is not counted)."""
  numbers, start = [], 0
  for end in np.flatnonzero(stream == EOD):
    number = int(stream[start] // 1000)
    np.testing.assert_array_equal(stream[start:end + 1], documents[number])
    numbers.append(number)
    start = end + 1
  return numbers


def _check_rows(batch, *, mask_eod_input=True, packing='documents'):
  """Invariants of every packed row: segments, positions, consecutive pairs, loss mask."""
  assert set(batch) == {'inputs', 'targets', 'segment_ids', 'positions', 'loss_mask'}
  for row in range(batch['inputs'].shape[0]):
    inputs, targets = batch['inputs'][row], batch['targets'][row]
    segments, positions = batch['segment_ids'][row], batch['positions'][row]
    used = segments > 0
    if not used.all():
      assert not used[np.argmin(used):].any()  # padding only at the end of a row
    if packing == 'stream':  # one segment, positions from the row's start, one window
      np.testing.assert_array_equal(segments, used)
      np.testing.assert_array_equal(positions, np.where(used, np.arange(len(used)), 0))
      np.testing.assert_array_equal(targets[used][:-1], inputs[used][1:])
    steps = np.diff(segments[used])
    assert np.all((steps == 0) | (steps == 1)) and (not used.any() or segments[0] == 1)
    starts = np.flatnonzero(np.diff(segments, prepend=0) != 0)
    for start, stop in zip(starts, list(starts[1:]) + [int(used.sum())]):
      if segments[start] == 0 or packing == 'stream':
        continue
      np.testing.assert_array_equal(positions[start:stop], np.arange(stop - start))
      # Each target is the next input of the same document: the pairs are real.
      np.testing.assert_array_equal(targets[start:stop - 1], inputs[start + 1:stop])
    assert np.all(positions[~used] == 0)
    expected_mask = used & (inputs != EOD) if mask_eod_input else used
    np.testing.assert_array_equal(batch['loss_mask'][row], expected_mask.astype(np.float32))


def test_packed_rows_never_mix_documents(corpus):
  pattern, documents = corpus
  batches = _take(pipeline.make_train_dataset(_data_config((pattern, 1.0)),
                                              global_batch_size=GLOBAL_BATCH), 40)
  for batch in batches:
    assert batch['inputs'].shape == (GLOBAL_BATCH, SEQ_LEN)
    assert batch['segment_ids'].min() >= 1  # an infinite stream fills every row
    _check_rows(batch)
    for row in range(GLOBAL_BATCH):  # one segment = one document
      for segment in np.unique(batch['segment_ids'][row]):
        owner = batch['inputs'][row][batch['segment_ids'][row] == segment] // 1000
        assert len(np.unique(owner)) == 1
  assert len(_stream_documents(batches, documents)) > 2 * len(documents)  # crossed epochs


def test_one_epoch_keeps_every_token(corpus):
  pattern, documents = corpus
  pairs_per_epoch = sum(len(d) - 1 for d in documents.values())
  count = -(-2 * pairs_per_epoch // (GLOBAL_BATCH * SEQ_LEN))  # about two epochs
  batches = _take(pipeline.make_train_dataset(_data_config((pattern, 1.0)),
                                              global_batch_size=GLOBAL_BATCH), count)
  numbers = _stream_documents(batches, documents)
  assert sorted(numbers[:len(documents)]) == sorted(documents)  # each document once per epoch
  assert sorted(numbers[len(documents):2 * len(documents)]) == sorted(documents)
  assert numbers[:len(documents)] != numbers[len(documents):2 * len(documents)]  # reshuffled
  inputs, _ = _pairs(batches)
  assert len(inputs) == count * GLOBAL_BATCH * SEQ_LEN  # no padding, nothing skipped


@pytest.mark.parametrize('packing', ['documents', 'stream'])
def test_evaluation_stream_pads_only_its_tail(corpus, packing):
  pattern, documents = corpus
  config = _data_config(('unused', 1.0), eval_sources=[dict(path=pattern)], packing=packing)
  batches = list(pipeline.make_eval_dataset(config, global_batch_size=GLOBAL_BATCH))
  tokens = sum(len(d) for d in documents.values())
  if packing == 'stream':  # every token once: the stream's tokens less its first input
    numbers, pairs = _stream_numbers(_token_stream(batches), documents), tokens - 1
  else:  # every document's pairs: its tokens less one
    numbers, pairs = _stream_documents(batches, documents), tokens - len(documents)
  assert numbers == sorted(documents)  # in shard order, nothing repeated
  used = np.concatenate([b['segment_ids'].reshape(-1) for b in batches]) > 0
  assert used.sum() == pairs
  assert not used[np.argmin(used):].any()  # the padding is one run at the very end
  for batch in batches:
    _check_rows(batch, packing=packing)


def test_loss_mask_at_document_ends_and_padding(corpus):
  pattern, documents = corpus
  config = _data_config(('unused', 1.0), eval_sources=[dict(path=pattern)])
  batches = list(pipeline.make_eval_dataset(config, global_batch_size=GLOBAL_BATCH))
  mask = np.concatenate([b['loss_mask'].reshape(-1) for b in batches])
  targets = np.concatenate([b['targets'].reshape(-1) for b in batches])
  used = np.concatenate([b['segment_ids'].reshape(-1) for b in batches]) > 0
  assert (~used).sum() > 0 and not mask[~used].any()  # padding never counts
  assert (targets[used] == EOD).sum() == len(documents)  # one end per document
  assert mask[used].all()  # every document's EOD target is trained (Megatron --eod-mask-loss)
  for batch in batches:
    _check_rows(batch)


# One packed row, position by position: document A = [11, 12, 13, EOD] and document B =
# [21, EOD, 22, 23, EOD], which holds an EOD inside it (as a Megatron corpus's documents can).
ROW_INPUTS = [11, 12, 13, 21, EOD, 22, 23] + [0] * 9
ROW_TARGETS = [12, 13, EOD, EOD, 22, 23, EOD] + [0] * 9
ROW_POSITIONS = [0, 1, 2, 0, 1, 2, 3] + [0] * 9
ROW_SEGMENTS = [1, 1, 1, 2, 2, 2, 2] + [0] * 9


def _write_row_documents(tmp_path):
  with ShardWriter(str(tmp_path / 'docs.array_record')) as writer:
    writer.write(np.array([11, 12, 13, EOD], np.int64))
    writer.write(np.array([21, EOD, 22, 23, EOD], np.int64))
  return str(tmp_path / '*')


@pytest.mark.parametrize('mask_eod_input, loss', [
    (True, [1, 1, 1, 1, 0, 1, 1]),  # the default
    (False, [1, 1, 1, 1, 1, 1, 1]),
])
def test_which_positions_of_a_packed_row_carry_loss(tmp_path, mask_eod_input, loss):
  config = _data_config(('unused', 1.0), eval_sources=[dict(path=_write_row_documents(tmp_path))],
                        mask_eod_input=mask_eod_input)
  (batch,) = list(pipeline.make_eval_dataset(config, global_batch_size=1))
  np.testing.assert_array_equal(batch['inputs'][0], ROW_INPUTS)
  np.testing.assert_array_equal(batch['targets'][0], ROW_TARGETS)
  np.testing.assert_array_equal(batch['positions'][0], ROW_POSITIONS)  # reset per document
  np.testing.assert_array_equal(batch['segment_ids'][0], ROW_SEGMENTS)
  # Each document's final EOD is a target with loss; only the prediction FROM an EOD input
  # (its next token) is masked, as Megatron's --eod-mask-loss does; padding never counts.
  np.testing.assert_array_equal(batch['loss_mask'][0], loss + [0] * 9)


def test_stream_rows_position_by_position(tmp_path):
  """data.packing='stream', seq_len 4: the documents [11, 12, 13, EOD], [21, EOD, 22, 23, EOD]
  and [31, EOD] make the stream 11 12 13 E 21 E 22 23 E 31 E; row i is the window
  stream[4 i : 4 i + 5] (inputs its first 4 tokens, targets its last 4), so consecutive rows
  share a token; EOD is an input (no loss there: --eod-mask-loss), positions count from each
  row's start, one segment per row. The finite eval stream pads its last row."""
  path = _write_row_documents(tmp_path)
  with ShardWriter(str(tmp_path / 'docs2.array_record')) as writer:
    writer.write(np.array([31, EOD], np.int64))
  config = _data_config(('unused', 1.0), eval_sources=[dict(path=path)], seq_len=4,
                        packing='stream')
  rows = {key: np.concatenate([b[key] for b in pipeline.make_eval_dataset(
      config, global_batch_size=1)]) for key in ('inputs', 'targets', 'positions',
                                                 'segment_ids', 'loss_mask')}
  np.testing.assert_array_equal(rows['inputs'], [[11, 12, 13, EOD], [21, EOD, 22, 23],
                                                 [EOD, 31, 0, 0]])
  np.testing.assert_array_equal(rows['targets'], [[12, 13, EOD, 21], [EOD, 22, 23, EOD],
                                                  [31, EOD, 0, 0]])
  np.testing.assert_array_equal(rows['positions'], [[0, 1, 2, 3], [0, 1, 2, 3], [0, 1, 0, 0]])
  np.testing.assert_array_equal(rows['segment_ids'], [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]])
  np.testing.assert_array_equal(rows['loss_mask'], [[1, 1, 1, 0], [1, 0, 1, 1], [0, 1, 0, 0]])


def test_stream_rows_are_windows_of_the_shuffled_document_stream(corpus):
  """Two epochs of 'stream' rows: consecutive windows of one token stream in which every
  document appears whole (its EOD included) once per epoch, reshuffled; nothing dropped."""
  pattern, documents = corpus
  tokens_per_epoch = sum(len(d) for d in documents.values())
  count = -(-2 * tokens_per_epoch // (GLOBAL_BATCH * SEQ_LEN))
  batches = _take(pipeline.make_train_dataset(_data_config((pattern, 1.0), packing='stream'),
                                              global_batch_size=GLOBAL_BATCH), count)
  for batch in batches:
    assert batch['segment_ids'].min() == 1  # an infinite stream fills every row
    _check_rows(batch, packing='stream')
  stream = _token_stream(batches)
  assert len(stream) == count * GLOBAL_BATCH * SEQ_LEN + 1
  numbers = _stream_numbers(stream, documents)
  first, second = numbers[:len(documents)], numbers[len(documents):2 * len(documents)]
  assert sorted(first) == sorted(second) == sorted(documents) and first != second


def test_stream_packing_names_a_document_without_eod(tmp_path):
  with ShardWriter(str(tmp_path / 'docs.array_record')) as writer:
    writer.write(np.array([11, 12, 13], np.int64))
  config = _data_config((str(tmp_path / '*'), 1.0), packing='stream')
  with pytest.raises(ValueError, match='data.packing=stream: document 0 of the stream ends with '
                     f'token 13, not data.eod_id={EOD}'):
    _take(pipeline.make_train_dataset(config, global_batch_size=GLOBAL_BATCH), 1)


@pytest.mark.parametrize('packing', ['documents', 'stream'])
def test_two_processes_split_each_epoch_into_disjoint_halves(corpus, packing):
  pattern, documents = corpus
  config = _data_config((pattern, 1.0), packing=packing)
  seen = []
  for process_index in range(2):
    dataset = pipeline.make_train_dataset(config, global_batch_size=GLOBAL_BATCH,
                                          process_index=process_index, process_count=2)
    batches = _take(dataset, 30)
    assert batches[0]['inputs'].shape == (GLOBAL_BATCH // 2, SEQ_LEN)
    numbers = (_stream_numbers(_token_stream(batches), documents) if packing == 'stream'
               else _stream_documents(batches, documents))
    seen.append(numbers[:len(documents) // 2])
  assert not set(seen[0]) & set(seen[1])
  assert sorted(seen[0] + seen[1]) == sorted(documents)


@pytest.mark.parametrize('packing, num_workers', [
    ('documents', 0), ('stream', 0), pytest.param('documents', 2, marks=pytest.mark.slow),
    pytest.param('stream', 2, marks=pytest.mark.slow)])
def test_restored_iterator_continues_exactly(corpus, packing, num_workers):
  pattern, _ = corpus
  config = _data_config((pattern, 1.0), num_workers=num_workers, packing=packing)
  make = lambda: iter(pipeline.make_train_dataset(config, global_batch_size=GLOBAL_BATCH))
  iterator = make()
  for _ in range(7):  # stop mid-epoch (an epoch is ~9 batches) and mid-document
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # as the checkpoint stores it
  expected = [next(iterator) for _ in range(12)]  # runs into the next, reshuffled epoch
  restored = make()
  restored.set_state(state)
  for want, got in zip(expected, [next(restored) for _ in range(12)]):
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


@pytest.mark.parametrize('packing', ['documents', 'stream'])
def test_a_restore_after_any_row_continues_exactly(corpus, packing):
  """Checkpoints after each of 24 one-row batches, restored from JSON: some fall where no
  document is partly packed, where grain's own state restore skipped a document."""
  pattern, _ = corpus
  config = _data_config((pattern, 1.0), packing=packing)
  make = lambda: iter(pipeline.make_train_dataset(config, global_batch_size=1))
  iterator, states, rows = make(), [], []
  for _ in range(24):
    states.append(json.loads(json.dumps(iterator.get_state())))
    rows.append(next(iterator)['inputs'])
  restored = make()
  for state, row in zip(states, rows):
    restored.set_state(state)
    np.testing.assert_array_equal(next(restored)['inputs'], row)


@pytest.mark.parametrize('packing', ['documents', 'stream'])
def test_mixture_weights_set_the_share_of_documents(tmp_path, packing):
  many = _write_shards(tmp_path / 'a', [range(1, 31)], seed=1)
  few = _write_shards(tmp_path / 'b', [range(101, 131)], seed=2)
  config = _data_config((str(tmp_path / 'a' / '*'), 3.0), (str(tmp_path / 'b' / '*'), 1.0),
                        packing=packing)
  batches = _take(pipeline.make_train_dataset(config, global_batch_size=GLOBAL_BATCH), 150)
  numbers = (_stream_numbers(_token_stream(batches), {**many, **few}) if packing == 'stream'
             else _stream_documents(batches, {**many, **few}))
  share = np.mean([number < 100 for number in numbers])
  assert len(numbers) > 300 and share == pytest.approx(0.75, abs=0.03)


def test_a_missing_shard_is_named(tmp_path):
  missing = str(tmp_path / 'train-00003.array_record')
  with pytest.raises(FileNotFoundError, match='train-00003.array_record'):
    pipeline.make_train_dataset(_data_config((missing, 1.0)), global_batch_size=GLOBAL_BATCH)


def _corrupt(path, how):
  data = bytearray(open(path, 'rb').read())
  if how == 'truncated':
    data = data[:len(data) // 2]
  elif how == 'garbage':
    data = bytearray(np.random.default_rng(0).integers(0, 256, len(data), np.uint8).tobytes())
  else:  # damaged records, intact footer: found only when a record is read
    data[100:2000] = bytes((b + 1) % 256 for b in data[100:2000])
  open(path, 'wb').write(bytes(data))


@pytest.mark.parametrize('how', ['truncated', 'garbage', 'damaged_records'])
def test_a_corrupt_shard_is_named(corpus, how):
  pattern, _ = corpus
  bad = pattern.replace('*', 'docs-1')
  _corrupt(bad, how)
  with pytest.raises(ValueError, match=r'token shard .*docs-1\.array_record') as error:
    _take(pipeline.make_train_dataset(_data_config((pattern, 1.0)),
                                      global_batch_size=GLOBAL_BATCH), 20)
  assert 'docs-0' not in str(error.value)


def test_a_shard_of_other_records_is_named(tmp_path):
  from array_record.python import array_record_module
  path = str(tmp_path / 'odd.array_record')
  writer = array_record_module.ArrayRecordWriter(path, 'group_size:1')
  writer.write(b'12345')  # 5 bytes: not uint32 tokens
  writer.close()
  with pytest.raises(ValueError, match='odd.array_record.*not a whole number of uint32'):
    _take(pipeline.make_train_dataset(_data_config((path, 1.0)),
                                      global_batch_size=GLOBAL_BATCH), 1)


def test_the_embedded_corpus_goes_through_the_same_pipeline():
  config = base.get_config().data  # embedded:python-stdlib, 1% of the files held out
  config.seq_len = 128
  batches = _take(pipeline.make_train_dataset(config, global_batch_size=2), 4)
  for batch in batches:
    assert batch['inputs'].shape == (2, 128)
    _check_rows(batch)
  eval_batch = next(iter(pipeline.make_eval_dataset(config, global_batch_size=2)))
  _check_rows(eval_batch)
  train_text = {tuple(b['inputs'][0][:32]) for b in batches}
  assert tuple(eval_batch['inputs'][0][:32]) not in train_text
