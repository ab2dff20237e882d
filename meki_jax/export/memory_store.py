"""The export directory: folded tables M~ as a zarr3 array (tensorstore) and the manifest.

  manifest.json         format, model config, table shape/dtype/layout, vocabulary, source
                        checkpoint, a sha256 and size per shard file and for the backbone
  config.json           the model config (config.model), for the PyTorch side
  backbone.safetensors  the RAM parameters (export/backbone.py)
  memory.zarr/          M~ as one array [vocab, num_layers, width], token-major (spec section 3),
                        stored under a scheme of export/table_quant.py (float32 | float16 |
                        bfloat16: width = d_mem values; int8 | int4: width bytes of values and
                        scales), recorded as the manifest's memory.scheme

Each shard file (memory.zarr/c/<i>/0/0) holds `rows_per_shard` tokens; inside it every token is
its own chunk [1, num_layers, width] followed by a crc32c, so one token's rows for all layers are
one contiguous read (MeKi-1.7B in fp16: 28 x 256 x 2 B = 14 KB; in int8 28 x 258 B = 7.1 KB)
and a flipped bit in it fails that read. Writes go to a temporary directory renamed into place
(files.replacing; on Cloud Storage copied, manifest.json last); the directory may be a gs:// URL
on both sides (tensorstore's gcs driver, files.path). Several processes can each write their own
vocabulary slice (whole shards) into it, and process 0 publishes the result. A local export's
rows are read with pread (export/shard_reader.py). Imports numpy, tensorstore, google-crc32c
and the standard library only (and meki_jax.files): the JAX exporter and the PyTorch side share
it.
"""

import collections
import hashlib
import json
import time

import numpy as np
import tensorstore as ts

from meki_jax import files
from meki_jax.export import shard_reader
from meki_jax.export.table_quant import SchemeError, TableScheme

FORMAT = 'meki-export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
CONFIG = 'config.json'
BACKBONE = 'backbone.safetensors'
TABLES = 'memory.zarr'
LAYOUT = 'token_major'  # axes [vocab, layers, d_mem]
_PARTS = 'parts'  # per-process shard records inside the temporary directory
DEFAULT_CACHE_BYTES = 16 << 20  # the readers' tensorstore cache
EXPORT = files.Kind('memory export', manifest=MANIFEST, format=FORMAT)  # what --overwrite replaces


class ExportError(ValueError):
  """An export directory is inconsistent or damaged; the message names the file and field."""


def _require(condition, message):
  if not condition:
    raise ExportError(message)


def shard_ranges(vocab_size, rows_per_shard):
  """[(start, stop)] of the shards' vocabulary rows."""
  _require(rows_per_shard > 0, f'rows_per_shard={rows_per_shard} must be positive')
  return [(start, min(start + rows_per_shard, vocab_size))
          for start in range(0, vocab_size, rows_per_shard)]


def process_shards(num_shards, process_index, process_count):
  """The shard indices process `process_index` of `process_count` writes: a contiguous block."""
  _require(0 <= process_index < process_count,
           f'process_index={process_index} is outside [0, process_count={process_count})')
  per_process = -(-num_shards // process_count)
  return range(min(process_index * per_process, num_shards),
               min((process_index + 1) * per_process, num_shards))


def shard_file(index):
  """The path of shard `index` relative to the export directory."""
  return f'{TABLES}/{shard_reader.shard_path(index)}'


def _table_spec(path, shape=None, dtype=None, rows_per_shard=None):
  """The zarr3 spec of memory.zarr; `shape` is the stored [vocab, num_layers, width]."""
  spec = {'driver': 'zarr3', 'kvstore': files.kvstore(path)}
  if shape is None:
    return spec
  num_layers, d_mem = shape[1:]
  raw = [{'name': 'bytes', 'configuration': {'endian': 'little'}}]
  spec['metadata'] = {
      'shape': list(shape), 'data_type': dtype, 'fill_value': 0,
      'chunk_grid': {'name': 'regular',
                     'configuration': {'chunk_shape': [rows_per_shard, num_layers, d_mem]}},
      'codecs': [{'name': 'sharding_indexed', 'configuration': {
          'chunk_shape': [1, num_layers, d_mem],  # one token, all layers
          'codecs': raw + [{'name': 'crc32c'}],
          'index_codecs': raw + [{'name': 'crc32c'}],
          'index_location': 'end'}}]}
  # Every shard file exists, even one whose rows are all zero, so each has a checksum.
  spec['store_data_equal_to_fill_value'] = True
  return spec


def file_record(path):
  """{'bytes', 'sha256'} of a file, read in 8 MiB blocks."""
  digest = hashlib.sha256()
  with files.path(path).open('rb') as f:
    for block in iter(lambda: f.read(1 << 23), b''):
      digest.update(block)
  return {'bytes': files.size(path), 'sha256': digest.hexdigest()}


class TableWriter:
  """Writes M~ shard by shard into `directory`/memory.zarr, overlapping I/O with the caller.

  `write_shard(index, rows)` encodes rows [shard rows, num_layers, d_mem] (float32) under the
  table scheme (table_quant.TableScheme) and starts the write; up to `max_in_flight` writes run
  while the caller folds the next shard (each holds its shard's rows). tensorstore commits a
  shard file by write, fsync and rename. `finish()` waits and returns the shards' file records.
  """

  def __init__(self, directory, shape, scheme, rows_per_shard, max_in_flight=2):
    self.directory = files.path(directory)
    self.scheme = scheme
    self.d_mem = shape[2]
    self.ranges = shard_ranges(shape[0], rows_per_shard)
    self.max_in_flight = max_in_flight
    stored = (shape[0], shape[1], scheme.stored_width(shape[2]))
    # Several processes may open the same new array: identical metadata opens, never clobbers.
    self.store = ts.open(_table_spec(self.directory / TABLES, stored,
                                     scheme.storage_dtype.name, rows_per_shard),
                         create=True, open=True).result()
    self._pending = collections.deque()  # writes in flight, oldest first
    self._written = []

  def write_shard(self, index, rows):
    start, stop = self.ranges[index]
    expected = (stop - start, self.store.shape[1], self.d_mem)
    _require(rows.shape == expected, f'shard {index}: rows have shape {rows.shape}, expected '
             f'{expected} (vocabulary rows [{start}, {stop}))')
    rows = np.ascontiguousarray(self.scheme.encode(rows))
    while len(self._pending) >= self.max_in_flight:
      self._pending.popleft().result()
    self._pending.append(self.store[start:stop].write(
        rows, can_reference_source_data_indefinitely=True))
    self._written.append(index)

  def flush(self):
    """Waits for the writes in flight."""
    while self._pending:
      self._pending.popleft().result()

  def finish(self):
    """Waits for the writes; returns {index: {'file', 'rows', 'bytes', 'sha256'}}."""
    self.flush()
    return {index: {'file': shard_file(index), 'rows': list(self.ranges[index]),
                    **file_record(self.directory / shard_file(index))}
            for index in self._written}


def _part_path(temporary, run_id, process_index, process_count):
  return temporary / _PARTS / f'{run_id}.{process_index}-of-{process_count}.json'


def write_part(temporary, run_id, process_index, process_count, shard_records):
  """Records that this process' shards are written (the signal process 0 waits for)."""
  path = _part_path(files.path(temporary), run_id, process_index, process_count)
  files.make_directory(path.parent)
  _write_json(path, {str(index): record for index, record in shard_records.items()})


def collect_parts(temporary, run_id, process_count, timeout_seconds, poll_seconds=1.0):
  """Waits for every process' part of run `run_id`; returns all shard records by index."""
  deadline = time.monotonic() + timeout_seconds
  records = {}
  for process_index in range(process_count):
    path = _part_path(files.path(temporary), run_id, process_index, process_count)
    while not path.exists():
      if time.monotonic() > deadline:
        raise TimeoutError(f'process {process_index} of {process_count} did not finish its '
                           f'shards of run {run_id!r} within {timeout_seconds} s ({path})')
      time.sleep(poll_seconds)
    records.update({int(index): record for index, record in _read_json(path).items()})
  return records


def _write_json(path, value):
  files.write_atomically(path, json.dumps(value, indent=1, sort_keys=True) + '\n')


def _read_json(path):
  try:
    return json.loads(files.path(path).read_text())
  except FileNotFoundError as error:
    raise ExportError(f'{path} does not exist: not a complete meki export') from error
  except json.JSONDecodeError as error:
    raise ExportError(f'{path} is not valid JSON: {error}') from error


def write_manifest(temporary, manifest):
  """Writes manifest.json and config.json (= manifest['model_config']) into the export."""
  _write_json(files.path(temporary) / CONFIG, manifest['model_config'])
  _write_json(files.path(temporary) / MANIFEST, manifest)


def remove_parts(temporary):
  """Removes the processes' shard records once process 0 has collected them."""
  files.remove(files.path(temporary) / _PARTS)


def memory_manifest(shape, scheme, rows_per_shard, shard_records):
  """The manifest's 'memory' entry: the table [vocab, layers, d_mem] (`shape`), its storage
  scheme and dtype, and its shard files in vocabulary order."""
  num_shards = len(shard_ranges(shape[0], rows_per_shard))
  missing = sorted(set(range(num_shards)) - set(shard_records))
  _require(not missing, f'shards {missing} of {num_shards} were not written')
  return {'path': TABLES, 'shape': list(shape), 'scheme': scheme.record(),
          'dtype': scheme.storage_dtype.name, 'layout': LAYOUT,
          'axes': ['vocab', 'layers', 'd_mem'], 'rows_per_shard': rows_per_shard,
          'shards': [shard_records[index] for index in range(num_shards)]}


# ---- Reading and validation (both sides) ----

def check_file(directory, record, what):
  """Fails unless the file of `record` ({'file', 'bytes', 'sha256'}) is there, whole and
  unaltered. A truncated file is reported by its size before anything is hashed."""
  path = files.path(directory) / record['file']
  _require(path.is_file(), f'{what} {record["file"]} is missing from {directory}')
  size = files.size(path)
  _require(size == record['bytes'], f'{what} {record["file"]} has {size} bytes, manifest.json '
           f'records {record["bytes"]}: the file is truncated or was replaced')
  digest = file_record(path)['sha256']
  _require(digest == record['sha256'], f'{what} {record["file"]} has sha256 {digest}, '
           f'manifest.json records {record["sha256"]}: the file is corrupted')


def read_manifest(directory):
  """manifest.json of an export, with its format, config and vocabulary checked."""
  directory = files.path(directory)
  manifest = _read_json(directory / MANIFEST)
  _require(manifest.get('format') == FORMAT and manifest.get('version') == FORMAT_VERSION,
           f'{directory / MANIFEST}: format={manifest.get("format")!r} '
           f'version={manifest.get("version")!r}, expected {FORMAT!r} version {FORMAT_VERSION}')
  for key in ('model_config', 'vocabulary', 'memory', 'backbone', 'source'):
    _require(key in manifest, f'{directory / MANIFEST} has no {key!r} entry')
  config = _read_json(directory / CONFIG)
  _require(config == manifest['model_config'], f'{directory / CONFIG} differs from '
           f'manifest.json model_config: the two files come from different exports')
  vocab = manifest['vocabulary']
  _require(vocab.get('size') == config['vocab_size'], f'manifest.json vocabulary.size='
           f'{vocab.get("size")} != model_config.vocab_size={config["vocab_size"]}')
  eod_id = vocab.get('eod_id')
  _require(eod_id is None or 0 <= eod_id < vocab['size'], f'manifest.json vocabulary.eod_id='
           f'{eod_id} is outside [0, vocabulary.size={vocab["size"]})')
  return manifest


def table_scheme(entry):
  """The TableScheme of a manifest's memory entry (manifests before schemes: its dtype)."""
  try:
    return TableScheme.from_record(entry.get('scheme', {'name': entry.get('dtype')}),
                                   'manifest.json memory.scheme')
  except SchemeError as error:
    raise ExportError(str(error)) from None


class FoldedMemory:
  """M~ of an export, opened read-only.

  `rows(token_ids)` -> the stored rows [..., num_layers, width] (table_quant); `program_inputs`
  -> the programs' memory inputs; `dequantized` -> float32 [..., num_layers, d_mem].
  A local export's rows are read from its shard files with pread on the caller's thread
  (export/shard_reader.py: a decode step's one-token read without tensorstore's thread pool),
  a remote one's through tensorstore. `cache_bytes` sizes tensorstore's cache, which keeps the
  shards' indexes (16 B per token) and recently read tokens; the files are immutable, so cached
  data is validated once, at open, not on every read (benchmarks/export_io.py: this halves the
  warm gather latency).
  """

  def __init__(self, directory, entry, model_config, cache_bytes=DEFAULT_CACHE_BYTES):
    self.shape = tuple(entry['shape'])
    self.scheme = table_scheme(entry)
    self.dtype = entry['dtype']
    expected = (model_config['vocab_size'], model_config['num_layers'],
                model_config['meki']['d_mem'])
    _require(self.shape == expected, f'manifest.json memory.shape={list(self.shape)} != '
             f'[vocab_size, num_layers, d_mem] of model_config = {list(expected)}')
    _require(self.dtype == self.scheme.storage_dtype.name, f'manifest.json memory.dtype='
             f'{self.dtype!r} does not fit memory.scheme {self.scheme.name!r} (stored as '
             f'{self.scheme.storage_dtype.name})')
    try:
      stored = self.shape[:2] + (self.scheme.stored_width(self.shape[2]),)
    except SchemeError as error:
      raise ExportError(f'manifest.json memory: {error}') from None
    _require(entry.get('layout') == LAYOUT, f'manifest.json memory.layout='
             f'{entry.get("layout")!r}, expected {LAYOUT!r}')
    context = ts.Context({'cache_pool': {'total_bytes_limit': cache_bytes}})
    path = files.path(directory) / entry['path']
    spec = {**_table_spec(path), 'recheck_cached_data': 'open',
            'recheck_cached_metadata': 'open'}
    try:
      self.store = ts.open(spec, open=True, read=True, context=context).result()
    except ValueError as error:
      raise ExportError(f'{path} cannot be opened as a zarr3 array: {error}') from error
    layout = self.store.chunk_layout
    checks = {'shape': (tuple(self.store.shape), stored),
              'dtype': (self.store.dtype.name, self.dtype),
              'shard (write chunk) shape': (tuple(layout.write_chunk.shape),
                                            (entry['rows_per_shard'],) + stored[1:]),
              'read chunk shape': (tuple(layout.read_chunk.shape), (1,) + stored[1:])}
    for name, (actual, recorded) in checks.items():
      _require(actual == recorded, f'{path}/zarr.json: {name} {actual} != manifest.json '
               f'{recorded}')
    self.reader = None if files.is_remote(path) else shard_reader.ShardReader(
        path, stored, self.store.dtype.numpy_dtype, entry['rows_per_shard'])

  def rows(self, token_ids):
    """token_ids (any int shape, values in [0, vocab)) -> stored rows [*shape, L, width]."""
    ids = np.asarray(token_ids)
    flat = ids.reshape(-1).astype(np.int64)
    bad = flat[(flat < 0) | (flat >= self.shape[0])]
    _require(bad.size == 0, f'token id {bad[:1].tolist()} is outside the vocabulary '
             f'[0, {self.shape[0]}) of the folded memory')
    try:
      if self.reader is not None:
        rows = self.reader.read(flat)
      elif flat.size == 1:
        rows = self.store[int(flat[0])].read().result()[None]
      else:
        rows = self.store[flat].read().result()
    except ValueError as error:  # a chunk's crc32c mismatch (tensorstore: DATA_LOSS)
      raise ExportError(f'reading the rows of token ids {flat[:8].tolist()}: {error}') from error
    return rows.reshape(ids.shape + tuple(self.store.shape[1:]))

  def program_inputs(self, token_ids):
    """token_ids [b, t] -> the programs' memory inputs as numpy arrays (table_quant.split)."""
    return self.scheme.split(self.rows(token_ids), self.shape[2])

  def dequantized(self, token_ids):
    """token_ids (any int shape) -> float32 rows [*shape, L, d_mem], as the programs see them."""
    return self.scheme.decode(self.rows(token_ids), self.shape[2])


def open_export(directory, verify_checksums=True, cache_bytes=DEFAULT_CACHE_BYTES):
  """(manifest, FoldedMemory or None for a dense model) of a validated export directory.

  Checks manifest vs config.json vs the zarr metadata (shapes, dtypes, chunking), the
  vocabulary, and with `verify_checksums` every shard file's and the backbone's size and sha256.
  """
  directory = files.path(directory)
  manifest = read_manifest(directory)
  config, entry = manifest['model_config'], manifest['memory']
  meki = config['meki']
  uses_memory = bool(meki['enabled']) and meki['d_mem'] > 0
  _require((entry is not None) == uses_memory, f'manifest.json memory={entry and "<table>"} '
           f'does not fit model_config.meki (enabled={meki["enabled"]}, d_mem={meki["d_mem"]})')
  if verify_checksums:
    check_file(directory, manifest['backbone'], 'backbone')
  if entry is None:
    return manifest, None
  ranges = shard_ranges(entry['shape'][0], entry['rows_per_shard'])
  _require(len(entry['shards']) == len(ranges), f'manifest.json lists {len(entry["shards"])} '
           f'shards; rows_per_shard={entry["rows_per_shard"]} over {entry["shape"][0]} rows '
           f'makes {len(ranges)}')
  for index, (record, rows) in enumerate(zip(entry['shards'], ranges)):
    _require(record['file'] == shard_file(index) and tuple(record['rows']) == rows,
             f'manifest.json memory.shards[{index}] = {record["file"]} rows {record["rows"]}, '
             f'expected {shard_file(index)} rows {list(rows)}')
    if verify_checksums:
      check_file(directory, record, f'memory shard {index}')
  return manifest, FoldedMemory(directory, entry, config, cache_bytes)
