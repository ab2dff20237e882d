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
