"""The export directory: token-major zarr3 tables, the manifest, and everything that must fail
loudly: a truncated or corrupted shard, a manifest that does not fit, an existing output."""

import json
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from meki_jax import files
from meki_jax.export import memory_store, table_quant
from meki_jax.export.exporter import export_folded
from meki_jax.fold import fold_params
from tests.export.conftest import moved_params

ROWS_PER_SHARD = 40  # vocabulary 97: shards of 40, 40 and 17 rows


@pytest.fixture
def model(tiny_model_config):
  """(config, training params, folded tables [L, V, m]) of a tiny MeKi model."""
  config = tiny_model_config()
  params = moved_params(config)
  tables = fold_params(params, config, ROWS_PER_SHARD)['layers']['meki']['folded_memory']
  return config, params, np.asarray(tables)


def export(model, out, **kwargs):
  config, params, _ = model
  return export_folded(params, config, out, rows_per_shard=ROWS_PER_SHARD,
                       vocabulary={'size': config.vocab_size, 'eod_id': 3}, **kwargs)


@pytest.mark.parametrize('dtype', ['float32', 'float16', 'bfloat16'])
def test_rows_are_the_folded_tables_token_major(model, tmp_path, dtype):
  """fp32 rows are fold_params' bit for bit; fp16/bf16 are JAX's rounding of them."""
  _, _, tables = model
  export(model, tmp_path / 'out', dtype=dtype)
  _, memory = memory_store.open_export(tmp_path / 'out')
  token_ids = np.array([[3, 96, 0, 3], [41, 40, 39, 80]])
  expected = np.asarray(jnp.asarray(tables).astype(dtype))[:, token_ids]  # [L, b, t, m]
  rows = memory.rows(token_ids)  # [b, t, L, m]
  assert rows.dtype == table_quant.FLOAT_DTYPES[dtype]
  np.testing.assert_array_equal(rows.view(np.uint8), np.moveaxis(expected, 0, 2).view(np.uint8))
  np.testing.assert_array_equal(memory.rows(np.array([96]))[0].view(np.uint8),
                                expected[:, 0, 1].view(np.uint8))  # one token: [L, m]


def test_a_token_is_one_contiguous_chunk_of_a_shard_file(model, tmp_path):
  config, _, tables = model
  manifest = export(model, tmp_path / 'out', dtype='float16')
  _, memory = memory_store.open_export(tmp_path / 'out')
  assert memory.store.chunk_layout.read_chunk.shape == (1, config.num_layers, 8)
  token_bytes = config.num_layers * 8 * 2 + 4  # rows of every layer, then their crc32c
  index_bytes = 16 * ROWS_PER_SHARD + 4
  assert [shard['bytes'] for shard in manifest['memory']['shards']] == [
      40 * token_bytes + index_bytes, 40 * token_bytes + index_bytes,
      17 * token_bytes + index_bytes]
  data = (tmp_path / 'out' / memory_store.shard_file(1)).read_bytes()
  token = 45  # row 5 of shard 1: its bytes are rows [L, m] in one run
  expected = tables[:, token].astype(np.float16).tobytes()
  assert data[5 * token_bytes:5 * token_bytes + len(expected)] == expected


@pytest.mark.parametrize('scheme', [table_quant.TableScheme('int8'),
                                    table_quant.TableScheme('int4', 4)])
def test_quantized_tables_are_stored_one_token_a_chunk(model, tmp_path, scheme):
  """A token's int8/int4 values and scales for every layer are one contiguous run of a shard
  file, the bytes table_quant encodes from the folded rows."""
  config, _, tables = model
  manifest = export(model, tmp_path / 'out', dtype=scheme.name, table_group_size=4)
  assert manifest['memory']['scheme'] == scheme.record()
  assert manifest['memory']['dtype'] == 'uint8' and manifest['memory']['shape'] == [97, 2, 8]
  _, memory = memory_store.open_export(tmp_path / 'out')
  width = scheme.stored_width(8)  # int8: 8 values + 2 scale bytes; int4: 4 + 2 * 2
  token_ids = np.array([[3, 96, 0]])
  expected = scheme.encode(np.moveaxis(tables[:, token_ids], 0, 2))  # [b, t, L, width]
  np.testing.assert_array_equal(memory.rows(token_ids), expected)
  np.testing.assert_array_equal(memory.dequantized(token_ids), scheme.decode(expected, 8))
  data = (tmp_path / 'out' / memory_store.shard_file(1)).read_bytes()
  token_bytes = config.num_layers * width + 4  # then its crc32c
  assert data[5 * token_bytes:5 * token_bytes + 2 * width] == scheme.encode(
      tables[:, 45]).tobytes()


def test_manifest_records_what_the_reader_needs(model, tmp_path):
  config, _, _ = model
  manifest = export(model, tmp_path / 'out', dtype='bfloat16',
                    source={'checkpoint': '/runs/x/checkpoints/7', 'step': 7})
  on_disk = json.loads((tmp_path / 'out' / memory_store.MANIFEST).read_text())
  assert on_disk == manifest
  assert manifest['model_config'] == json.loads(json.dumps(config.to_dict()))
  assert manifest['source']['step'] == 7
  memory = manifest['memory']
  assert (memory['shape'], memory['dtype'], memory['scheme'], memory['layout']) == (
      [97, 2, 8], 'bfloat16', {'name': 'bfloat16'}, 'token_major')
  assert [shard['rows'] for shard in memory['shards']] == [[0, 40], [40, 80], [80, 97]]
  assert all(len(shard['sha256']) == 64 for shard in memory['shards'])
  assert sorted(os.listdir(tmp_path)) == ['out']  # no temporary left behind


def test_a_truncated_shard_is_rejected(model, tmp_path):
  export(model, tmp_path / 'out')
  shard = tmp_path / 'out' / memory_store.shard_file(2)
  shard.write_bytes(shard.read_bytes()[:-100])
  with pytest.raises(memory_store.ExportError, match='shard 2 .* is truncated'):
    memory_store.open_export(tmp_path / 'out')


def test_a_corrupted_shard_is_rejected_by_checksum_and_by_its_reads(model, tmp_path):
  export(model, tmp_path / 'out')
  shard = tmp_path / 'out' / memory_store.shard_file(0)
  data = bytearray(shard.read_bytes())
  data[7 * (2 * 8 * 2 + 4) + 3] ^= 0x10  # one bit of token 7's rows
  shard.write_bytes(bytes(data))
  with pytest.raises(memory_store.ExportError, match='shard 0 .* is corrupted'):
    memory_store.open_export(tmp_path / 'out')
  # Opened without the (whole-file) checksums, the token's own crc32c still fails its read.
  _, memory = memory_store.open_export(tmp_path / 'out', verify_checksums=False)
  memory.rows(np.array([6, 8]))
  with pytest.raises(memory_store.ExportError,
                     match=r'token ids \[7\]: .*/c/0/0/0: the rows of token 7: crc32c mismatch'):
    memory.rows(np.array([7]))


@pytest.mark.parametrize('dtype', ['bfloat16', 'int4'])
def test_shard_reads_are_tensorstores(model, tmp_path, dtype):
  """Every token's rows read by the shard reader are the bytes tensorstore reads, the
  last shard's unwritten index entries (tokens 97-119) included in its check."""
  export(model, tmp_path / 'out', dtype=dtype, table_group_size=4)
  _, memory = memory_store.open_export(tmp_path / 'out')
  token_ids = np.arange(97)[::-1]
  rows = memory.reader.read(token_ids)
  np.testing.assert_array_equal(rows.view(np.uint8),
                                memory.store[token_ids].read().result().view(np.uint8))
  assert rows.dtype == memory.store.dtype.numpy_dtype


@pytest.mark.parametrize('damage, message', [
    (lambda data: data[:-1] + bytes([data[-1] ^ 1]), 'the shard index: crc32c mismatch'),
    (lambda data: data[:100], '100 bytes, shorter than its index'),
    (lambda data: b'', '0 bytes, shorter than its index'),
])
def test_a_damaged_shard_fails_its_first_read(model, tmp_path, damage, message):
  """Opened without the whole-file checksums, a shard whose index is damaged, that is cut
  short or empty fails the first read of one of its tokens, naming the file; the other
  shards still read."""
  export(model, tmp_path / 'out')
  shard = tmp_path / 'out' / memory_store.shard_file(1)
  shard.write_bytes(damage(shard.read_bytes()))
  _, memory = memory_store.open_export(tmp_path / 'out', verify_checksums=False)
  memory.rows(np.array([0, 96]))
  with pytest.raises(memory_store.ExportError, match=f'/c/1/0/0: {message}'):
    memory.rows(np.array([45]))


def _edit(path, edit):
  value = json.loads(path.read_text())
  edit(value)
  path.write_text(json.dumps(value))


WRONG_MANIFESTS = {
    'shape': (lambda m: m['memory'].update(shape=[97, 3, 8]),
              r'memory.shape=\[97, 3, 8\] != \[vocab_size, num_layers, d_mem\]'),
    'dtype': (lambda m: m['memory'].update(dtype='float32'),
              "memory.dtype='float32' does not fit memory.scheme 'float16'"),
    'scheme': (lambda m: m['memory'].update(scheme={'name': 'int8', 'scale_dtype': 'float16',
                                                     'group_size': None}),
               "memory.dtype='float16' does not fit memory.scheme 'int8'"),
    'unknown scheme': (lambda m: m['memory'].update(scheme={'name': 'int2'}),
                       "memory.scheme=.*'int2' is not one of"),
    'rows_per_shard': (lambda m: m['memory'].update(rows_per_shard=50), 'makes 2'),
    'vocabulary': (lambda m: m['vocabulary'].update(size=96), 'vocabulary.size=96'),
    'eod_id': (lambda m: m['vocabulary'].update(eod_id=97), 'vocabulary.eod_id=97'),
    'config': (lambda m: m['model_config'].update(d_model=64), 'differs from'),
    'version': (lambda m: m.update(version=2), 'version=2'),
    'checksum': (lambda m: m['memory']['shards'][1].update(sha256='0' * 64), 'corrupted'),
}


@pytest.mark.parametrize('name', WRONG_MANIFESTS)
def test_a_manifest_that_does_not_fit_is_rejected(model, tmp_path, name):
  export(model, tmp_path / 'out', dtype='float16')
  edit, message = WRONG_MANIFESTS[name]
  _edit(tmp_path / 'out' / memory_store.MANIFEST, edit)
  with pytest.raises(memory_store.ExportError, match=message):
    memory_store.open_export(tmp_path / 'out')


def test_a_second_export_needs_overwrite_and_leaves_the_first_untouched(model, tmp_path):
  config, params, _ = model
  out = tmp_path / 'out'
  export(model, out, dtype='float32')
  before = {path: path.read_bytes() for path in out.rglob('*') if path.is_file()}
  doubled = {**params, 'embed': {'embedding': params['embed']['embedding'] * 2}}
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    export_folded(doubled, config, out, rows_per_shard=ROWS_PER_SHARD)
  assert {path: path.read_bytes() for path in out.rglob('*') if path.is_file()} == before
  assert sorted(os.listdir(tmp_path)) == ['out']

  export_folded(doubled, config, out, rows_per_shard=ROWS_PER_SHARD, dtype='float32',
                overwrite=True)
  assert (out / memory_store.BACKBONE).read_bytes() != before[out / memory_store.BACKBONE]
  memory_store.open_export(out)
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_processes_write_their_own_slices_into_one_export(model, tmp_path):
  """Two processes (run here one after the other) give the single-process export exactly."""
  whole = export(model, tmp_path / 'whole')
  assert [list(memory_store.process_shards(3, i, 2)) for i in range(2)] == [[0, 1], [2]]
  assert export(model, tmp_path / 'split', process_index=1, process_count=2,
                run_id='job-1') is None
  assert not (tmp_path / 'split').exists()  # published by process 0 only
  split = export(model, tmp_path / 'split', process_index=0, process_count=2, run_id='job-1',
                 timeout_seconds=5)
  assert split['memory'] == whole['memory']
  with pytest.raises(ValueError, match='needs a run_id'):
    export(model, tmp_path / 'other', process_index=0, process_count=2)


def test_process_zero_times_out_when_another_process_never_finishes(model, tmp_path):
  with pytest.raises(TimeoutError, match='process 1 of 2 did not finish'):
    export(model, tmp_path / 'out', process_index=0, process_count=2, run_id='job-2',
           timeout_seconds=0.5)
  assert not (tmp_path / 'out').exists()
  shutil.rmtree(files.temporary_path(tmp_path / 'out'))
