"""Outputs written beside and swapped in: --overwrite never deletes a source or someone else's
directory, and a failed write keeps the old output (issue 21, point 1)."""

import json
import os

import numpy as np
import pytest

from meki_jax import files

EXPORT = files.Kind('memory export', manifest='manifest.json', format='meki-export')
TABLE = files.Kind('host-memory table', magic=b'\x93NUMPY')


def _tree(directory):
  """{relative path: bytes} of every file under `directory`."""
  return {os.path.relpath(os.path.join(root, name), directory):
          open(os.path.join(root, name), 'rb').read()
          for root, _, names in os.walk(directory) for name in names}


def _our_output(directory, text='old'):
  directory.mkdir(parents=True)
  (directory / 'manifest.json').write_text(json.dumps({'format': 'meki-export'}))
  (directory / 'data').write_text(text)


def _write(out, text, **kwargs):
  with files.replacing(out, EXPORT, **kwargs) as temporary:
    (temporary / 'manifest.json').write_text(json.dumps({'format': 'meki-export'}))
    (temporary / 'data').write_text(text)


@pytest.mark.parametrize('where', ['the source', 'its parent', 'inside it'])
def test_overwrite_never_touches_a_source_or_what_holds_it(tmp_path, where):
  source = tmp_path / 'run'
  _our_output(source)  # even one of our outputs, when this command reads it
  (source / 'checkpoints').mkdir()
  (source / 'checkpoints' / 'step').write_text('weights')
  before = _tree(tmp_path)
  out = {'the source': source, 'its parent': tmp_path, 'inside it': source / 'export'}[where]
  relation = {'the source': 'is an input', 'its parent': f'contains {source}, an input',
              'inside it': f'lies inside {source}, an input'}[where]
  with pytest.raises(ValueError, match=f'{out} {relation} of this command: write the memory '
                                       'export somewhere else'):
    _write(out, 'new', overwrite=True, sources=(source,))
  assert _tree(tmp_path) == before


def test_overwrite_replaces_only_an_output_of_the_same_kind(tmp_path):
  notes = tmp_path / 'notes'
  notes.mkdir()
  (notes / 'todo.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='notes exists and is not a memory export \\(it has no '
                                            'manifest.json with "format": "meki-export"\\)'):
    _write(notes, 'new', overwrite=True)
  assert _tree(notes) == {'todo.txt': b'keep me'}
  (tmp_path / 'user.npy').write_text('not an array')
  with pytest.raises(FileExistsError, match="does not begin with b'\\\\x93NUMPY'"):
    files.check_output(tmp_path / 'user.npy', TABLE, overwrite=True)


def test_an_old_output_is_replaced_only_with_overwrite_and_only_once_the_new_one_is_complete(
    tmp_path):
  out = tmp_path / 'out'
  _our_output(out)
  with pytest.raises(FileExistsError, match='out exists; pass --overwrite to replace it'):
    _write(out, 'new', overwrite=False)
  with pytest.raises(RuntimeError, match='the export failed'):
    with files.replacing(out, EXPORT, overwrite=True) as temporary:
      (temporary / 'data').write_text('half')
      raise RuntimeError('the export failed')
  assert (out / 'data').read_text() == 'old'
  assert sorted(os.listdir(tmp_path)) == ['out']  # no partial output left
  _write(out, 'new', overwrite=True)
  assert (out / 'data').read_text() == 'new'
  assert sorted(os.listdir(tmp_path)) == ['out']


def test_a_file_output_is_swapped_in_by_one_rename(tmp_path):
  path = tmp_path / 'tables.npy'
  for value in (1.0, 2.0):
    with files.replacing(path, TABLE, overwrite=True) as temporary, open(temporary, 'wb') as f:
      np.save(f, np.full(3, value))
    assert np.load(path)[0] == value
  assert sorted(os.listdir(tmp_path)) == ['tables.npy']


def test_an_error_without_a_file_name_gets_one(tmp_path):
  with pytest.raises(OSError, match=f"No space left on device: '{tmp_path / 'f'}'"):
    with files.naming(tmp_path / 'f'):
      raise OSError(28, 'No space left on device')


def test_a_path_is_a_local_path_or_a_gs_url_and_nothing_else(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert files.path('run') == tmp_path / 'run'
  assert str(files.path('gs://bucket/run/')) == 'gs://bucket/run'
  assert files.kvstore('gs://bucket/run/memory.zarr') == {
      'driver': 'gcs', 'bucket': 'bucket', 'path': 'run/memory.zarr'}
  assert files.kvstore('run') == {'driver': 'file', 'path': str(tmp_path / 'run')}
  with pytest.raises(ValueError, match='s3://b/run: s3:// URLs are not supported; use a local '
                                       'path or gs://bucket/...'):
    files.path('s3://b/run')
  with pytest.raises(ValueError, match='needs a bucket'):
    files.path('gs:///run')
  with pytest.raises(ValueError, match='gs://b/t.npy must be a local path: it is memory-mapped'):
    files.require_local('gs://b/t.npy', 'it is memory-mapped')


def _objects(prefix):
  """{relative name: bytes} of every object below `prefix`."""
  return {name: (files.path(prefix) / name).read_bytes() for name in files.files_under(prefix)}


def test_on_cloud_storage_an_output_appears_with_its_manifest_last(gcs_bucket, monkeypatch):
  out = f'{gcs_bucket}/exports/out'
  _write(out, 'old', overwrite=False)
  assert _objects(out) == {'manifest.json': b'{"format": "meki-export"}', 'data': b'old'}
  with pytest.raises(FileExistsError, match=f'{out} exists; pass --overwrite'):
    _write(out, 'new', overwrite=False)
  with pytest.raises(RuntimeError, match='the export failed'):
    with files.replacing(out, EXPORT, overwrite=True) as temporary:
      (temporary / 'data').write_text('half')
      raise RuntimeError('the export failed')
  assert _objects(out)['data'] == b'old'
  assert files.files_under(f'{gcs_bucket}/exports') == ['out/data', 'out/manifest.json']

  calls = []  # what the swap does, in order: no reader may see a manifest before the data
  copy, remove = files._copy_objects, files.remove
  monkeypatch.setattr(files, '_copy_objects', lambda source, target, names: (
      calls.append(('copy', names)), copy(source, target, names)))
  monkeypatch.setattr(files, 'remove', lambda location: (
      calls.append(('remove', str(location)[len(gcs_bucket):])), remove(location)))
  _write(out, 'new', overwrite=True)
  assert calls == [('remove', '/exports/.out.partial'), ('remove', '/exports/out/manifest.json'),
                   ('remove', '/exports/out'), ('copy', ['data']), ('copy', ['manifest.json']),
                   ('remove', '/exports/.out.partial')]
  assert _objects(out)['data'] == b'new'
  assert files.files_under(f'{gcs_bucket}/exports') == ['out/data', 'out/manifest.json']


def test_on_cloud_storage_sources_and_other_files_are_never_replaced(gcs_bucket):
  run = f'{gcs_bucket}/run'
  files.write_atomically(f'{run}/checkpoints/2/state', 'weights')
  with pytest.raises(ValueError, match=f'{run}/export lies inside {run}, an input'):
    _write(f'{run}/export', 'new', overwrite=True, sources=(run,))
  files.write_atomically(f'{gcs_bucket}/notes/todo.txt', 'keep me')
  with pytest.raises(FileExistsError, match='notes exists and is not a memory export'):
    _write(f'{gcs_bucket}/notes', 'new', overwrite=True)
  assert _objects(gcs_bucket) == {'run/checkpoints/2/state': b'weights',
                                  'notes/todo.txt': b'keep me'}
  with pytest.raises(FileNotFoundError, match='bucket gs://no-such-bucket does not exist'):
    _write('gs://no-such-bucket/out', 'new', overwrite=False)


def test_files_move_stage_and_copy_on_cloud_storage(gcs_bucket, tmp_path):
  staged = files.Staged(f'{gcs_bucket}/a/shard')
  staged.local.write_bytes(b'records')
  assert not files.path(f'{gcs_bucket}/a/shard').exists()  # nothing until the upload
  staged.commit()
  assert not staged.local.exists() and files.size(f'{gcs_bucket}/a/shard') == 7
  files.write_atomically(f'{gcs_bucket}/a/b/c.json', '{}')
  files.move(f'{gcs_bucket}/a', f'{gcs_bucket}/aside/a')
  assert _objects(gcs_bucket) == {'aside/a/shard': b'records', 'aside/a/b/c.json': b'{}'}
  with files.local_copy(f'{gcs_bucket}/aside/a/shard') as local:
    assert local.read_bytes() == b'records'
  assert not local.exists()
