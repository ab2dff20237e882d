"""Exports on Cloud Storage, against the local server: the memory export written to gs:// equals
the local one byte for byte and reads back the same rows; the exporter reads a checkpoint from
gs://, and the device programs run from the gs:// export (issue 23)."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from meki_jax import files
from meki_jax.export import exporter, memory_store, to_device
from tests.export.conftest import moved_params
from tests.export.test_to_device import run_device


def _contents(directory, skip=()):
  """{relative path: bytes} of the files of an export directory, local or gs://."""
  return {name: (files.path(directory) / name).read_bytes()
          for name in files.files_under(directory) if name not in skip}


def test_a_memory_export_to_gs_equals_the_local_one_and_refuses_a_damaged_shard(
    tiny_model_config, gcs_bucket, tmp_path):
  config = tiny_model_config()
  params = moved_params(config)
  write = lambda out: exporter.export_folded(params, config, out, dtype='float16',
                                             rows_per_shard=40)
  write(tmp_path / 'local')
  write(f'{gcs_bucket}/exports/model')
  assert _contents(f'{gcs_bucket}/exports/model') == _contents(tmp_path / 'local')
  assert files.files_under(f'{gcs_bucket}/exports') == [
      f'model/{name}' for name in files.files_under(tmp_path / 'local')]  # nothing partial left
  token_ids = np.array([[3, 96, 0, 41]])
  _, local = memory_store.open_export(tmp_path / 'local')
  _, remote = memory_store.open_export(f'{gcs_bucket}/exports/model')
  np.testing.assert_array_equal(remote.rows(token_ids), local.rows(token_ids))

  shard = files.path(f'{gcs_bucket}/exports/model') / memory_store.shard_file(1)
  raw = bytearray(shard.read_bytes())
  raw[100] ^= 0x01
  shard.write_bytes(bytes(raw))
  with pytest.raises(memory_store.ExportError, match='memory shard 1 memory.zarr/c/1/0/0 has '
                                                     'sha256 .* the file is corrupted'):
    memory_store.open_export(f'{gcs_bucket}/exports/model')


@pytest.mark.slow
def test_export_reads_a_gs_checkpoint_publishes_to_gs_and_run_device_runs_from_it(
    trained_run, exported, gcs_bucket, tmp_path):
  config, workdir, config_file = trained_run
  local_export, reference = exported
  files._filesystem().put(str(workdir / 'checkpoints'), f'{gcs_bucket}/run/checkpoints',
                          recursive=True)  # a local run copied to the bucket, commit marks too
  remote_params, step = exporter.restore_params(config, f'{gcs_bucket}/run')  # the evaluation's
  local_params, _ = exporter.restore_params(config, workdir)
  assert step == config.train.num_steps
  jax.tree_util.tree_map(np.testing.assert_array_equal, remote_params, local_params)
  out = f'{gcs_bucket}/exports/model'
  subprocess.run([sys.executable, 'tools/export_memory.py', f'--config={config_file}',
                  f'--checkpoint={gcs_bucket}/run', f'--out={out}', '--dtype=float32',
                  '--rows_per_shard=16384'], check=True)
  manifest = memory_store.read_manifest(out)
  assert manifest['source']['checkpoint'] == f'{gcs_bucket}/run/checkpoints/{step}'
  assert _contents(out, skip=('manifest.json',)) == _contents(local_export,
                                                               skip=('manifest.json',))

  to_device.write_device_export(out, tmp_path / 'device', cache_len=64, formats=('pt2',))
  assert run_device(out, tmp_path / 'device', 'pt2') == reference['tokens']
  with pytest.raises(ValueError, match='must be a local path: the device programs are written'):
    to_device.write_device_export(out, f'{gcs_bucket}/device', cache_len=64)
