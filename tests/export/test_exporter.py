"""The JAX side of the export: restoring a checkpoint's parameters, and the command line."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from meki_jax import sharding
from meki_jax.export import backbone, checkpoint_reader, exporter, memory_store, to_device
from meki_jax.model.transformer import build_model
from meki_jax.train import checkpoint, checksums, optim, state as state_lib
from meki_jax.train.errors import RunError
from tests.export.conftest import moved_params


def _save_on_8_devices(workdir):
  """(config, state) of a small MeKi model saved as step 5 of `workdir` from an 8-device mesh:
  every array is stored in chunks, the devices' shards."""
  config = base.get_config()
  config.model = base.model_config(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1,
                                   d_ff=64, d_mem=8)
  config.model.update(vocab_size=256, head_dim=16, dtype='float32', remat_policy='none')
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh)
  assert mesh.size == 8
  state = state_lib.create_state(model, optimizer, mesh, sharding.axis_rules(config.mesh),
                                 jax.random.PRNGKey(0))
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  checkpoint.save(manager, 5, state, None, force=True)
  manager.wait_until_finished()
  manager.close()
  return config, state


def test_restore_reads_the_parameters_of_a_checkpoint_written_on_8_devices(tmp_path):
  config, state = _save_on_8_devices(tmp_path)
  for location in (tmp_path, tmp_path / 'checkpoints' / '5'):
    params, step = exporter.restore_params(config, location)
    assert step == 5
    jax.tree_util.tree_map(np.testing.assert_array_equal, params, jax.device_get(state.params))
  with pytest.raises(FileNotFoundError, match='neither a checkpoint step directory'):
    exporter.restore_params(config, tmp_path / 'checkpoints')
  config.model.meki.d_mem = 16
  with pytest.raises(ValueError, match='cannot be restored into this config'):
    exporter.restore_params(config, tmp_path)


def test_a_dense_model_exports_its_backbone_alone(tiny_model_config, tmp_path):
  config = tiny_model_config(meki=dict(enabled=False))
  manifest = exporter.export_folded(moved_params(config), config, tmp_path / 'out')
  assert manifest['memory'] is None
  assert not (tmp_path / 'out' / memory_store.TABLES).exists()
  model, memory, _ = to_device.load_export(tmp_path / 'out')
  assert memory is None and not model.uses_memory


def test_the_vocabulary_must_cover_the_tokenizer():
  data = base.get_config().data
  record = exporter.vocabulary_record(data, 151_680)
  assert record == {'size': 151_680, 'tokenizer': 'qwen3', 'tokens_in_use': 151_669,
                    'eod_id': 151_643}
  with pytest.raises(ValueError, match='uses 151669 ids, more than model.vocab_size=1000'):
    exporter.vocabulary_record(data, 1000)


def test_command_line_refuses_to_replace_an_export(trained_run, tmp_path):
  _, workdir, config_file = trained_run
  out = tmp_path / 'out'
  command = [sys.executable, 'tools/export_memory.py', f'--config={config_file}',
             f'--checkpoint={workdir}', f'--out={out}']
  first = subprocess.run(command, capture_output=True, text=True)
  assert first.returncode == 0, first.stderr[-2000:]
  manifest = json.loads((out / memory_store.MANIFEST).read_text())
  assert manifest['source'] == {'checkpoint': str(workdir / 'checkpoints' / '36'), 'step': 36}
  assert manifest['vocabulary']['tokens_in_use'] == 151_669
  assert manifest['memory']['dtype'] == 'float16'  # the default
  assert len(manifest['memory']['shards']) == 19  # 151,680 rows / 8192
  before = (out / memory_store.MANIFEST).stat().st_mtime_ns

  second = subprocess.run(command, capture_output=True, text=True)
  assert second.returncode != 0 and 'pass --overwrite' in second.stderr
  assert (out / memory_store.MANIFEST).stat().st_mtime_ns == before
  memory_store.open_export(out)


def test_overwrite_never_deletes_the_checkpoint_it_reads(trained_run):
  config, workdir, _ = trained_run
  for checkpoint_path in (workdir, workdir / 'checkpoints' / '36'):
    for out in (workdir, workdir.parent, workdir / 'export', workdir / 'checkpoints' / '37'):
      with pytest.raises(ValueError, match='an input of this command: write the memory export'):
        exporter.export_checkpoint(checkpoint_path, config.model, out, overwrite=True)
  assert checksums.verify(str(workdir / 'checkpoints' / '36')) is None
  assert not (workdir / 'export').exists() and not (workdir / 'checkpoints' / '37').exists()


def test_a_workdir_whose_newest_step_is_damaged_exports_the_newest_intact_one(tmp_path, capsys):
  """The trainer's and generate's rule (checksums.newest_intact), for every reader."""
  for step in (1, 2):
    (tmp_path / 'checkpoints' / str(step) / 'state').mkdir(parents=True)
    (tmp_path / 'checkpoints' / str(step) / 'state' / 'data').write_bytes(bytes(range(256)))
    checksums.write_manifest(str(tmp_path / 'checkpoints' / str(step)))
  damaged = tmp_path / 'checkpoints' / '2' / 'state' / 'data'
  damaged.write_bytes(bytes(reversed(range(256))))
  assert checkpoint_reader.checkpoint_step_dir(tmp_path) == tmp_path / 'checkpoints' / '1'
  assert capsys.readouterr().err == (f'checkpoint step 2 is damaged and skipped: {damaged} does '
                                     'not match its checksum (its bytes changed after the save)\n')
  with pytest.raises(ValueError, match='checkpoints/2 does not verify against its checksum'):
    checkpoint_reader.checkpoint_step_dir(tmp_path / 'checkpoints' / '2')
  (tmp_path / 'checkpoints' / '1' / 'state' / 'data').write_bytes(b'')
  with pytest.raises(RunError, match='no checkpoint in .* passes verification: step 2: .*; '
                                     'step 1: '):
    checkpoint_reader.checkpoint_step_dir(tmp_path)


@pytest.mark.slow
def test_two_processes_export_one_directory_concurrently(trained_run, tmp_path):
  config, workdir, config_file = trained_run
  command = lambda index: [sys.executable, 'tools/export_memory.py', f'--config={config_file}',
                           f'--checkpoint={workdir}', f'--out={tmp_path / "split"}',
                           '--rows_per_shard=16384', '--process_count=2',
                           f'--process_index={index}', '--run_id=test-run']
  processes = [subprocess.Popen(command(index), stderr=subprocess.PIPE, text=True)
               for index in (1, 0)]
  for process in processes:
    assert process.wait(timeout=600) == 0, process.stderr.read()[-2000:]
  params, step = exporter.restore_params(config, workdir)
  whole = exporter.export_folded(params, config.model, tmp_path / 'whole',
                                 rows_per_shard=16384)
  split = json.loads((tmp_path / 'split' / memory_store.MANIFEST).read_text())
  assert split['memory'] == whole['memory'] and split['source']['step'] == step
  memory_store.open_export(tmp_path / 'split')


@pytest.mark.parametrize('baseline', ['ple', 'engram'])
def test_baselines_without_a_device_branch_are_refused(tiny_model_config, tmp_path, baseline):
  config = tiny_model_config()
  config[baseline].enabled = True
  with pytest.raises(ValueError, match=f'model.{baseline}.enabled: the device graph'):
    exporter.export_folded(None, config, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_streaming_export_equals_the_in_memory_path(trained_run, tmp_path):
  """export_checkpoint (array by array from disk) writes the files restore_params +
  export_folded write: same shard and backbone checksums."""
  config, workdir, _ = trained_run
  params, step = exporter.restore_params(config, workdir)
  whole = exporter.export_folded(params, config.model, tmp_path / 'whole', rows_per_shard=16384,
                                 source={'step': step})
  streamed = exporter.export_checkpoint(workdir, config.model, tmp_path / 'streamed',
                                        rows_per_shard=16384, source={'step': step},
                                        read_bytes=4096)  # a few layers per backbone read
  assert streamed == whole
  assert len(whole['memory']['shards']) == 10
  for name in (memory_store.MANIFEST, memory_store.BACKBONE, memory_store.shard_file(3)):
    assert ((tmp_path / 'streamed' / name).read_bytes() ==
            (tmp_path / 'whole' / name).read_bytes()), name


def test_streaming_export_reads_across_the_chunks_of_8_devices(tmp_path):
  """Vocabulary shards of 48 rows over chunks of 32 (one read per chunk) and backbone blocks of
  whole chunks: the same files as restoring every parameter and exporting from memory."""
  config, _ = _save_on_8_devices(tmp_path / 'run')
  source = checkpoint_reader.CheckpointParams(tmp_path / 'run')
  assert source.chunks(exporter.TABLE) == (2, 32, 8)  # [layers, vocab / 8 devices, d_mem]
  params, step = exporter.restore_params(config, tmp_path / 'run')
  kernel = ('layers', 'mlp', 'gate', 'kernel')  # [2, 32, 64]
  assert source.chunks(kernel) == (2, 4, 64)
  box = (slice(1, 2), slice(3, 29), slice(5, 60))
  np.testing.assert_array_equal(source.read(kernel, box),
                                params['layers']['mlp']['gate']['kernel'][box])
  whole = exporter.export_folded(params, config.model, tmp_path / 'whole', rows_per_shard=48,
                                 source={'step': step})
  streamed = exporter.export_checkpoint(tmp_path / 'run', config.model, tmp_path / 'streamed',
                                        rows_per_shard=48, source={'step': step}, read_bytes=64)
  assert streamed == whole and len(whole['memory']['shards']) == 6
  names = [memory_store.MANIFEST, memory_store.BACKBONE] + [
      memory_store.shard_file(index) for index in range(6)]
  for name in names:
    assert ((tmp_path / 'streamed' / name).read_bytes() ==
            (tmp_path / 'whole' / name).read_bytes()), name


class OddChunks(checkpoint_reader.TreeParams):
  """The same tree, read in chunks that cut layers, heads and columns where no tensor does."""

  def chunks(self, path):
    return tuple(size // 3 + 1 for size in self.shape(path))


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16'])
def test_backbone_written_chunk_by_chunk_equals_the_whole_tensors(tiny_model_config, tmp_path,
                                                                  dtype):
  """Blocks of a layer-stacked leaf land in each layer's tensor in the file's layout (transposed,
  heads merged): the same bytes as writing every tensor whole."""
  config = tiny_model_config(meki=dict(position='after_ffn'))
  params = moved_params(config)
  config_dict = json.loads(json.dumps(config.to_dict()))
  backbone.write_backbone(tmp_path / 'whole', backbone.backbone_tensors(
      exporter.ram_params(params), config_dict), config_dict, dtype)
  exporter.write_backbone(OddChunks(params), tmp_path / 'blocks', config_dict, dtype,
                          read_bytes=64)
  assert (tmp_path / 'blocks').read_bytes() == (tmp_path / 'whole').read_bytes()


def test_reads_are_planned_in_whole_chunks():
  shape, chunks = (5, 7, 4), (5, 2, 3)
  for max_bytes, expected in ((4, (5, 2, 3)), (4 * 60, (5, 2, 4)), (4 * 5 * 4 * 4, (5, 4, 4)),
                              (1 << 20, shape)):
    blocks = checkpoint_reader.read_blocks(shape, chunks, max_bytes)
    covered = np.zeros(shape, int)
    for index in blocks:
      covered[index] += 1
      assert all(part.start % step == 0 for part, step in zip(index, chunks))  # chunk-aligned
    assert (covered == 1).all()
    assert tuple(part.stop - part.start for part in blocks[0]) == expected


def test_reader_skips_the_optimizer_state(trained_run):
  _, workdir, _ = trained_run
  source = checkpoint_reader.CheckpointParams(workdir)
  assert source.step == 36 and ('layers', 'mlp', 'gate', 'kernel') in source.paths
  assert not any('mu' in path or 'nu' in path for path in source.paths)
  with pytest.raises(KeyError, match='no array params/opt_state'):
    source.read(('opt_state',))


@pytest.mark.parametrize('where', ['memory_table', 'projection', 'embedding', 'attention'])
def test_non_finite_parameters_are_not_exported(tiny_model_config, tmp_path, where):
  config = tiny_model_config()
  params = jax.tree_util.tree_map(np.copy, moved_params(config))
  layers = params['layers']
  if where == 'memory_table':
    layers['meki']['memory']['memory_table'][1, 70] = np.nan
    message = r'memory_table layer 1: rows \[70\]'
  elif where == 'projection':
    layers['meki']['memory']['projection']['gate']['kernel'][1, 0, 0] = np.inf
    message = r'projection/gate/kernel \(axis 0: layers\): rows \[1\]'
  elif where == 'embedding':
    params['embed']['embedding'][[5, 9]] = np.nan
    message = r'params/embed/embedding: rows \[5, 9\] \(2 of them\)'
  else:
    layers['attn']['q']['kernel'][0, 3] = np.nan
    message = r'params/layers/attn/q/kernel layer 0'
  with pytest.raises(exporter.NonFiniteError, match=message):
    exporter.export_folded(params, config, tmp_path / 'out', rows_per_shard=64)
  assert not (tmp_path / 'out').exists()
