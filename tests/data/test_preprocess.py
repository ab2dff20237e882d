"""Raw corpora -> token shards: every format round-trips to the tokenizer's ids; bad input fails
naming the file; an existing output is never replaced by accident."""

import gzip
import json
import os
import struct
import subprocess
import sys

import grain
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from meki_jax.data import megatron, preprocess
from meki_jax.data.shards import decode_record
from meki_jax.data.tokenizer import load_tokenizer

DOCUMENTS = ['Hello world', 'def f(x):\n    return x + 1\n', '日本語と中文 😀 q\u0307',
             'tabs\tand   spaces\n\n\nand blank lines', '<|endoftext|> is text here']


@pytest.fixture(scope='module')
def qwen3():
  return load_tokenizer('qwen3')


def _expected(tokenizer, texts):
  return [tokenizer.encode(text) + [tokenizer.eod_id] for text in texts]


def _read_output(directory):
  """All documents of the shards in `directory`, in shard order: [[token ids]]."""
  paths = sorted(str(p) for p in directory.glob('*.array_record'))
  return [decode_record(record).tolist()
          for path in paths for record in grain.sources.ArrayRecordDataSource(path)]


def _run(inputs, output, **options):
  return preprocess.preprocess(inputs, output, progress=False, **options)


def test_jsonl_round_trips(tmp_path, qwen3):
  lines = ''.join(json.dumps({'text': text, 'id': i}) + '\n' for i, text in enumerate(DOCUMENTS))
  (tmp_path / 'a.jsonl').write_text(lines + '\n')  # a trailing blank line is ignored
  with gzip.open(tmp_path / 'b.jsonl.gz', 'wt') as stream:
    stream.write(lines)
  summary = _run([str(tmp_path / '*.jsonl*')], tmp_path / 'out')
  assert _read_output(tmp_path / 'out') == _expected(qwen3, DOCUMENTS * 2)
  assert (summary.documents, summary.shards, summary.skipped) == (10, 2, 0)
  assert summary.tokens == sum(map(len, _expected(qwen3, DOCUMENTS * 2)))
  record = json.loads((tmp_path / 'out' / preprocess.SUMMARY_FILE).read_text())
  assert record['eod_id'] == qwen3.eod_id and record['tokens'] == summary.tokens


def test_zstandard_compressed_jsonl_round_trips(tmp_path, qwen3):
  zstandard = pytest.importorskip('zstandard')
  lines = ''.join(json.dumps({'text': text}) + '\n' for text in DOCUMENTS)
  (tmp_path / 'a.jsonl.zst').write_bytes(zstandard.ZstdCompressor().compress(lines.encode()))
  _run([str(tmp_path / 'a.jsonl.zst')], tmp_path / 'out')
  assert _read_output(tmp_path / 'out') == _expected(qwen3, DOCUMENTS)


def test_parquet_round_trips_row_group_by_row_group(tmp_path, qwen3):
  texts = DOCUMENTS * 3 + [None, '']  # nulls and empty strings are skipped
  table = pa.table({'id': list(range(len(texts))), 'content': texts})
  pq.write_table(table, tmp_path / 'train.parquet', row_group_size=4)
  summary = _run([str(tmp_path / 'train.parquet')], tmp_path / 'out', text_field='content')
  assert _read_output(tmp_path / 'out') == _expected(qwen3, DOCUMENTS * 3)
  assert (summary.shards, summary.skipped) == (5, 2)  # 17 rows in row groups of 4


def test_text_files_round_trip_per_file_and_per_blank_line_block(tmp_path, qwen3):
  for i, text in enumerate(DOCUMENTS):
    (tmp_path / 'files' / f'{i}.txt').parent.mkdir(exist_ok=True)
    (tmp_path / 'files' / f'{i}.txt').write_text(text)
  _run([str(tmp_path / 'files' / '*.txt')], tmp_path / 'per_file', shard_documents=2)
  assert _read_output(tmp_path / 'per_file') == _expected(qwen3, DOCUMENTS)
  assert len(list((tmp_path / 'per_file').glob('*.array_record'))) == 3

  blocks = ['first paragraph,\nsecond line', '  indented code()', '最后一段 😀']
  (tmp_path / 'book.txt').write_text('\n\n'.join(blocks) + '\n\n \n\n')
  _run([str(tmp_path / 'book.txt')], tmp_path / 'blocks', text_split='blank_lines')
  assert _read_output(tmp_path / 'blocks') == _expected(qwen3, blocks)


_DTYPE_CODES = {np.uint16: 8, np.int32: 4, np.int64: 5}


def _write_megatron(prefix, documents, dtype):
  """A Megatron MMIDIDX dataset; each document is a list of sequences of token ids."""
  sizes, pointers, starts = [], [], [0]
  with open(f'{prefix}.bin', 'wb') as data:
    for sequences in documents:
      for sequence in sequences:
        pointers.append(data.tell())
        data.write(np.asarray(sequence, dtype).tobytes())
        sizes.append(len(sequence))
      starts.append(len(sizes))
  with open(f'{prefix}.idx', 'wb') as index:
    index.write(megatron.HEADER)
    index.write(struct.pack('<QBQQ', 1, _DTYPE_CODES[dtype], len(sizes), len(starts)))
    index.write(np.asarray(sizes, '<i4').tobytes())
    index.write(np.asarray(pointers, '<i8').tobytes())
    index.write(np.asarray(starts, '<i8').tobytes())


def test_megatron_datasets_round_trip_and_gain_a_missing_eod(tmp_path, qwen3):
  eod = qwen3.eod_id
  ids = [qwen3.encode(text) for text in DOCUMENTS]
  with_eod = [[ids[0] + [eod]], [ids[1][:3], ids[1][3:] + [eod]], [ids[2] + [eod]]]  # 2 sentences
  _write_megatron(str(tmp_path / 'wiki_text_document'), with_eod, np.int32)
  without_eod = [[ids[3]], [ids[4][:1], ids[4][1:]], []]  # uint16 ids, and an empty document
  _write_megatron(str(tmp_path / 'code_text_document'), without_eod, np.uint16)
  summary = _run([str(tmp_path / 'wiki_text_document'), str(tmp_path / 'code_text_document.bin')],
                 tmp_path / 'out', shard_documents=2)
  expected = [ids[3] + [eod], ids[4] + [eod], ids[0] + [eod], ids[1] + [eod], ids[2] + [eod]]
  assert _read_output(tmp_path / 'out') == expected  # the code dataset's name sorts first
  assert (summary.documents, summary.skipped, summary.shards) == (5, 1, 4)


def test_workers_write_what_one_process_writes_and_the_tool_reports(tmp_path):
  for i in range(3):
    lines = ''.join(json.dumps({'text': f'{i}: {t}'}) + '\n' for t in DOCUMENTS)
    (tmp_path / f'{i}.jsonl').write_text(lines)
  _run([str(tmp_path / '*.jsonl')], tmp_path / 'serial', num_workers=1)
  tool = os.path.join(os.path.dirname(__file__), '..', '..', 'tools', 'preprocess.py')
  result = subprocess.run(
      [sys.executable, tool, f'--input={tmp_path}/*.jsonl', f'--output={tmp_path}/parallel',
       '--num_workers=2'], capture_output=True, text=True, check=True)
  assert _read_output(tmp_path / 'parallel') == _read_output(tmp_path / 'serial')
  assert '15 documents' in result.stdout and 'tokens/s' in result.stdout
  assert '3 shards' in result.stdout


def test_an_existing_output_is_replaced_only_with_overwrite(tmp_path, qwen3):
  (tmp_path / 'a.txt').write_text('old')
  _run([str(tmp_path / 'a.txt')], tmp_path / 'out')
  (tmp_path / 'a.txt').write_text('new')
  with pytest.raises(FileExistsError, match='out exists; pass --overwrite'):
    _run([str(tmp_path / 'a.txt')], tmp_path / 'out')
  assert _read_output(tmp_path / 'out') == _expected(qwen3, ['old'])
  _run([str(tmp_path / 'a.txt')], tmp_path / 'out', overwrite=True)
  assert _read_output(tmp_path / 'out') == _expected(qwen3, ['new'])
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.txt', 'out']  # no temporaries left


def test_overwrite_never_deletes_an_input_or_a_directory_of_other_files(tmp_path):
  (tmp_path / 'corpus').mkdir()
  (tmp_path / 'corpus' / 'a.txt').write_text('my only copy')
  with pytest.raises(ValueError, match='corpus contains .*a.txt, an input of this command'):
    _run([str(tmp_path / 'corpus' / 'a.txt')], tmp_path / 'corpus', overwrite=True)
  (tmp_path / 'notes').mkdir()
  (tmp_path / 'notes' / 'todo.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='notes exists and is not a token-shard directory'):
    _run([str(tmp_path / 'corpus' / 'a.txt')], tmp_path / 'notes', overwrite=True)
  assert (tmp_path / 'corpus' / 'a.txt').read_text() == 'my only copy'
  assert [p.name for p in (tmp_path / 'notes').iterdir()] == ['todo.txt']


def test_a_truncated_gzip_file_is_named_with_the_last_line_read(tmp_path):
  data = gzip.compress(''.join(json.dumps({'text': f'document {i} ' * 20}) + '\n'
                               for i in range(2000)).encode())
  (tmp_path / 'a.jsonl.gz').write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match=r'a\.jsonl\.gz: unreadable after line \d+ \(EOFError: '
                                       r'Compressed file ended .*\); is the file truncated or '
                                       r'corrupt\?'):
    _run([str(tmp_path / 'a.jsonl.gz')], tmp_path / 'out')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.jsonl.gz']  # nothing half-written


def test_a_record_without_the_text_field_is_named(tmp_path):
  (tmp_path / 'a.jsonl').write_text('{"text": "fine"}\n{"content": "no text field"}\n')
  with pytest.raises(ValueError, match=r"a\.jsonl:2: no field 'text'.*\['content'\]"):
    _run([str(tmp_path / 'a.jsonl')], tmp_path / 'out')
  assert sorted(p.name for p in tmp_path.iterdir()) == ['a.jsonl']  # nothing half-written


def test_a_parquet_file_without_the_text_column_is_named(tmp_path):
  pq.write_table(pa.table({'content': ['x']}), tmp_path / 'a.parquet')
  with pytest.raises(ValueError, match=r"a\.parquet: no column 'text'.*\['content'\]"):
    _run([str(tmp_path / 'a.parquet')], tmp_path / 'out')


@pytest.mark.parametrize('cut', [5, 40, -8])
def test_a_truncated_megatron_index_is_named(tmp_path, cut):
  prefix = str(tmp_path / 'corpus_text_document')
  _write_megatron(prefix, [[[1, 2, 3]], [[4, 5]]], np.int32)
  data = open(f'{prefix}.idx', 'rb').read()
  open(f'{prefix}.idx', 'wb').write(data[:cut])
  with pytest.raises(ValueError, match=r'corpus_text_document\.idx.*truncated'):
    _run([prefix], tmp_path / 'out')


def test_a_truncated_megatron_data_file_is_named(tmp_path):
  prefix = str(tmp_path / 'corpus_text_document')
  _write_megatron(prefix, [[[1, 2, 3]], [[4, 5]]], np.int32)
  os.truncate(f'{prefix}.bin', 12)
  with pytest.raises(ValueError, match=r'corpus_text_document\.bin.*truncated'):
    _run([prefix], tmp_path / 'out')


def test_megatron_ids_beyond_the_vocabulary_are_named(tmp_path):
  prefix = str(tmp_path / 'other_tokenizer')
  _write_megatron(prefix, [[[1, 2, 200_000]]], np.int32)
  with pytest.raises(ValueError, match=r'other_tokenizer\.bin: document 0 .*another tokenizer'):
    _run([prefix], tmp_path / 'out')


def test_an_input_that_matches_nothing_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing-here'):
    _run([str(tmp_path / 'nothing-here*.jsonl')], tmp_path / 'out')
