"""What the runner trusts is checked: device.json's binding covers every field (an edited cache
length or table scheme is refused), the programs belong to the memory export and store their
tables in the scheme the programs dequantize, and every program of the bundle is verified
whichever runtime runs."""

import json
import shutil
import subprocess
import sys

import pytest

from meki_jax.export import device_runtime, exporter, memory_store, to_device
from tests.export.conftest import CACHE_LEN


def flip_byte(path):
  """Flips the bits of the byte in the middle of `path`, in place."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.fixture(scope='module')
def two_bundles(exported, trained_run, tmp_path_factory):
  """Two (memory export, device export) pairs of the trained model: fp32 and int8 tables."""
  config, workdir, _ = trained_run
  directory, _ = exported
  base = tmp_path_factory.mktemp('bundles')
  other = base / 'memory-int8'
  exporter.export_checkpoint(workdir, config.model, other, dtype='int8', rows_per_shard=16384)
  for memory_dir, device_dir in ((directory, base / 'device-a'), (other, base / 'device-b')):
    to_device.write_device_export(memory_dir, device_dir, cache_len=CACHE_LEN, formats=('pt2',))
  return (directory, base / 'device-a'), (other, base / 'device-b')


def edit_device_json(device_dir, edit):
  path = device_dir / to_device.DEVICE_MANIFEST
  device = json.loads(path.read_text())
  edit(device)
  path.write_text(json.dumps(device))


def test_device_json_binds_each_program_to_the_memory_export(two_bundles):
  (memory_a, device_a), (memory_b, _) = two_bundles
  device = device_runtime.read_device_export(device_a, memory_a, 'pt2')
  assert set(device['files']) == {'prefill', 'decode'} and device['tables'] == {'name': 'float32'}
  for record in device['files'].values():
    assert len(record['sha256']) == 64 and record['bytes'] == (device_a / record['file']).stat(
        ).st_size
  with pytest.raises(memory_store.ExportError, match='the programs belong to another export'):
    device_runtime.read_device_export(device_a, memory_b, 'pt2')
  with pytest.raises(memory_store.ExportError, match=r"no \['executorch'\] program"):
    device_runtime.read_device_export(device_a, memory_a, 'pte')


@pytest.mark.parametrize('field, value', [
    ('cache_len', CACHE_LEN + 1), ('logits', 'all'), ('tables', {'name': 'float16'}),
    ('quantization', {'linear': '8da4w', 'group_size': 32, 'embedding': None}),
    ('signature', {'inputs': [], 'outputs': [], 't': {}})])
def test_an_edited_field_of_device_json_is_refused(two_bundles, tmp_path, field, value):
  (memory_a, device_a), _ = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  edit_device_json(tmp_path / 'device', lambda device: device.update({field: value}))
  with pytest.raises(memory_store.ExportError, match='device.json was edited or damaged'):
    device_runtime.read_device_export(tmp_path / 'device', memory_a, 'pt2')


def test_tables_in_another_scheme_are_refused_even_with_a_consistent_device_json(two_bundles,
                                                                                 tmp_path):
  """A device.json rewritten whole (binding recomputed) for the int8 export's manifest, over
  programs that take fp32 rows: the scheme check names both schemes."""
  (_, device_a), (memory_b, _) = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')

  def retarget(device):
    device['source_manifest_sha256'] = memory_store.file_record(
        memory_b / memory_store.MANIFEST)['sha256']
    device['binding_sha256'] = to_device.binding_digest(device)
  edit_device_json(tmp_path / 'device', retarget)
  with pytest.raises(memory_store.ExportError, match=r"tables=\{'name': 'float32'\} but .* "
                     r"memory.scheme=\{'name': 'int8'.*another scheme"):
    device_runtime.read_device_export(tmp_path / 'device', memory_b, 'pt2')


@pytest.mark.parametrize('program', ['prefill.pt2', 'decode.pt2'])
def test_programs_swapped_between_exports_are_refused(two_bundles, tmp_path, program):
  (memory_a, device_a), (_, device_b) = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  shutil.copy(device_b / program, tmp_path / 'device' / program)
  with pytest.raises(memory_store.ExportError,
                     match=f'program {program.split(".")[0]} {program} has .*device.json'):
    device_runtime.read_device_export(tmp_path / 'device', memory_a, 'pt2')


def test_every_program_is_verified_whichever_runtime_runs(two_bundles, tmp_path):
  """A flipped byte in a .pt2 stops a run of the .pte too (and the other way round)."""
  (memory_a, device_a), _ = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  (tmp_path / 'device' / to_device.PTE).write_bytes(b'not a program')
  pte_record = memory_store.file_record(tmp_path / 'device' / to_device.PTE)

  def add_pte(device):
    device['files']['executorch'] = {'file': to_device.PTE, **pte_record}
    device['binding_sha256'] = to_device.binding_digest(device)
  edit_device_json(tmp_path / 'device', add_pte)
  device_runtime.read_device_export(tmp_path / 'device', memory_a, 'pte')  # intact: accepted
  flip_byte(tmp_path / 'device' / 'decode.pt2')
  with pytest.raises(memory_store.ExportError, match='decode.pt2 has sha256 .*corrupted'):
    device_runtime.read_device_export(tmp_path / 'device', memory_a, 'pte')


def test_run_tool_refuses_a_damaged_or_foreign_bundle(two_bundles, tmp_path):
  (memory_a, device_a), (memory_b, _) = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  edit_device_json(tmp_path / 'device', lambda device: device.update(cache_len=CACHE_LEN + 1))
  for memory_dir, device_dir, message in ((memory_b, device_a, 'belong to another export'),
                                          (memory_a, tmp_path / 'device', 'edited or damaged')):
    result = subprocess.run(
        [sys.executable, 'tools/run_device.py', f'--memory={memory_dir}',
         f'--device={device_dir}', '--runtime=pt2', '--token_ids=1000,1001',
         '--max_new_tokens=2'], capture_output=True, text=True)
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert 'ids:' not in result.stdout


@pytest.mark.slow
def test_a_dense_bundle_runs_under_both_runtimes(tiny_model_config, tmp_path):
  """A dense model (no memory inputs) exports and runs as .pt2 and as .pte, checked, giving
  the eager model's greedy tokens."""
  import numpy as np
  import torch
  from tests.export.conftest import moved_params
  from tests.export.test_device_model import eager_steps
  config = tiny_model_config(meki=dict(enabled=False))
  exporter.export_folded(moved_params(config), config, tmp_path / 'dense')
  to_device.write_device_export(tmp_path / 'dense', tmp_path / 'device', cache_len=16,
                                logits='all')
  model, memory, _ = to_device.load_export(tmp_path / 'dense')
  assert memory is None
  prompt = torch.tensor([[5, 17, 3]])
  for runtime in ('pt2', 'pte'):
    _, prefill, decode_fn = device_runtime.device_runners(tmp_path / 'device',
                                                          tmp_path / 'dense', runtime)
    logits, tokens, _ = device_runtime.Session(None, prefill, decode_fn, 16).greedy(prompt, 6)
    sequence = torch.cat([prompt, tokens[:, :-1]], dim=1)
    with torch.no_grad():
      expected = eager_steps(model, sequence, None, prompt_len=3)
    assert tokens[0].tolist() == expected[0, 2:].argmax(-1).tolist(), runtime
    np.testing.assert_allclose(logits.numpy(), expected[:, :3].numpy(), rtol=0, atol=1e-4)
