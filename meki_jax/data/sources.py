"""Raw corpora -> document texts: JSON lines, Parquet and plain text files.

Each reader yields the texts of one piece of an input, the unit that one preprocessing worker
turns into one token shard: a JSON-lines file (`.jsonl`/`.json`/`.ndjson`, optionally `.gz` or
`.zst`), one row group of a Parquet file (FineWeb-Edu's layout: a string column `text`), or a
group of text files (one document per file, or per blank-line-separated block). Every error
names the file (and line or column) that does not fit.
"""

import gzip
import io
import json
import re
import sys
import zlib

FORMATS = ('jsonl', 'parquet', 'text', 'megatron')
TEXT_SPLITS = ('file', 'blank_lines')
_JSONL_SUFFIXES = ('.jsonl', '.json', '.ndjson')
_BLANK_LINES = re.compile(r'\n(?:[ \t\r\f\v]*\n)+')  # a line end and one or more blank lines


def detect_format(path):
  """A file's format from its name: JSON lines, Parquet, Megatron .bin/.idx, else text."""
  name = str(path).lower()
  for suffix in ('.gz', '.zst'):
    name = name.removesuffix(suffix)
  if name.endswith(_JSONL_SUFFIXES):
    return 'jsonl'
  if name.endswith('.parquet'):
    return 'parquet'
  if name.endswith(('.bin', '.idx')):
    return 'megatron'
  return 'text'


def _open_text(path):
  """A text stream over `path`, decompressing .gz and .zst."""
  name = str(path).lower()
  if name.endswith('.gz'):
    return gzip.open(path, 'rt', encoding='utf-8')
  if name.endswith('.zst'):
    try:
      import zstandard
    except ModuleNotFoundError as error:
      raise ValueError(f'{path}: reading .zst files needs the zstandard package '
                       '(pip install zstandard)') from error
    return io.TextIOWrapper(zstandard.open(path, 'rb'), encoding='utf-8')
  return open(path, encoding='utf-8')


def _undecodable(path, error):
  return ValueError(f'{path} is not UTF-8 text ({error})')


def _read_errors():
  """What reading a damaged file raises: a truncated or corrupt .gz or .zst, an I/O error."""
  zstandard = sys.modules.get('zstandard')
  return (EOFError, OSError, zlib.error) + ((zstandard.ZstdError,) if zstandard else ())


def _damaged(path, error, line_number=None):
  after = f' after line {line_number}' if line_number else ''
  return ValueError(f'{path}: unreadable{after} ({type(error).__name__}: {error}); is the file '
                    'truncated or corrupt?')


def read_jsonl(path, text_field):
  """Yields the `text_field` string of every record (line) of a JSON-lines file."""
  position = [0]  # the last line read, for the message about a damaged file
  try:
    yield from _read_jsonl(path, text_field, position)
  except UnicodeDecodeError as error:
    raise _undecodable(path, error) from error
  except _read_errors() as error:
    raise _damaged(path, error, position[0]) from error


def _read_jsonl(path, text_field, position):
  with _open_text(path) as lines:
    for line_number, line in enumerate(lines, 1):
      position[0] = line_number
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f'{path}:{line_number}: not a JSON record ({error})') from error
      if not isinstance(record, dict) or text_field not in record:
        fields = sorted(record) if isinstance(record, dict) else type(record).__name__
        raise ValueError(f'{path}:{line_number}: no field {text_field!r} in the record '
                         f'(it has {fields}); choose the field with --text_field')
      text = record[text_field]
      if not isinstance(text, str):
        raise ValueError(f'{path}:{line_number}: field {text_field!r} is a '
                         f'{type(text).__name__}, not a string')
      yield text


def parquet_row_groups(path, text_field):
  """The number of row groups of a Parquet file; fails unless `text_field` is a string column."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  try:
    parquet_file = pq.ParquetFile(path)
  except (pa.ArrowException, OSError) as error:
    raise ValueError(f'{path} is not a readable Parquet file: {error}') from error
  schema = parquet_file.schema_arrow
  if text_field not in schema.names:
    raise ValueError(f'{path}: no column {text_field!r} (columns: {schema.names}); choose the '
                     'column with --text_field')
  column_type = schema.field(text_field).type
  if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
    raise ValueError(f'{path}: column {text_field!r} is {column_type}, not a string column')
  return parquet_file.num_row_groups


def read_parquet(path, row_group, text_field):
  """Yields the `text_field` strings of one row group of a Parquet file (nulls as '')."""
  import pyarrow.parquet as pq
  table = pq.ParquetFile(path).read_row_group(row_group, columns=[text_field])
  for text in table.column(0).to_pylist():
    yield text or ''


def read_text(paths, split):
  """Yields documents of text files: each file ('file') or each blank-line-separated block."""
  if split not in TEXT_SPLITS:
    raise ValueError(f'text split {split!r} is not one of {TEXT_SPLITS}')
  for path in paths:
    try:
      with _open_text(path) as stream:
        text = stream.read()
    except UnicodeDecodeError as error:
      raise _undecodable(path, error) from error
    except _read_errors() as error:
      raise _damaged(path, error) from error
    if split == 'file':
      yield text
    else:
      yield from (block.strip('\r\n') for block in _BLANK_LINES.split(text))
