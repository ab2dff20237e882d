"""The issue's bar, on a small trained model: the exported PyTorch programs (.pt2 in this and
in a fresh process, .pte under executorch.runtime) give the JAX folded model's logits for a
prefill and 32 greedy decode steps, and the same tokens."""

import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meki_jax import decode
from meki_jax.export import exporter, memory_store, to_device
from meki_jax.fold import fold_params
from meki_jax.model.transformer import build_model
from tests.export.conftest import CYCLE_START, cycle_successor, moved_params

STEPS = 32
CACHE_LEN = 64
# fp32 on both sides; they differ in summation order only (measured ~2e-6 on logits ~±20).
TOLERANCE = 1e-4
PROMPT = [CYCLE_START + 7, CYCLE_START + 30, CYCLE_START + 11, CYCLE_START + 2]


@pytest.fixture(scope='module')
def exported(trained_run, tmp_path_factory):
  """(export dir, JAX reference) for the trained model, exported by the CLI in fp32."""
  config, workdir, config_file = trained_run
  out = tmp_path_factory.mktemp('export') / 'model'
  subprocess.run([sys.executable, 'tools/export_memory.py', f'--config={config_file}',
                  f'--checkpoint={workdir}', f'--out={out}', '--dtype=float32',
                  '--rows_per_shard=16384'], check=True)
  params, _ = exporter.restore_params(config, workdir)
  return out, jax_reference(params, config.model)


def jax_reference(params, model_config):
  """The JAX folded model on PROMPT: prefill logits [t, vocab], then STEPS greedy tokens and the
  logits each was chosen from [STEPS, vocab] (meki_jax.decode with its KV cache)."""
  folded = fold_params(params, model_config)
  prompt = jnp.array([PROMPT], jnp.int32)
  prefill_logits = build_model(model_config, folded=True).apply({'params': folded}, prompt)[0]
  model = build_model(model_config, folded=True, decode=True)
  decode_params = decode.decode_params(folded, model_config)
  cache = decode.init_cache(model_config, 1, CACHE_LEN)
  cache = decode.prefill(model, decode_params, cache, prompt[:, :-1], 0)
  token, position, tokens, logits = prompt[:, -1], len(PROMPT) - 1, [], []
  for _ in range(STEPS):  # the first step feeds the last prompt token
    token, step_logits, cache = decode.decode_step(
        model, decode_params, cache, token, jnp.array([position]), jax.random.PRNGKey(0),
        decode.Sampling())
    tokens.append(int(token[0]))
    logits.append(np.asarray(step_logits[0]))
    position += 1
  return {'prefill_logits': np.asarray(prefill_logits), 'tokens': tokens,
          'logits': np.stack(logits)}


def greedy(session):
  """Session.greedy on PROMPT for batch row 0, as numpy: (prefill logits [t, vocab], tokens
  [STEPS], the logits each token was chosen from [STEPS, vocab])."""
  prefill_logits, tokens, logits = session.greedy(torch.tensor([PROMPT]), STEPS)
  return prefill_logits[0].numpy(), tokens[0].tolist(), logits[:, 0].numpy()


def assert_matches(reference, prefill_logits, tokens, logits):
  assert list(tokens) == reference['tokens']
  differences = (np.abs(prefill_logits - reference['prefill_logits']).max(),
                 np.abs(logits - reference['logits']).max())
  assert max(differences) <= TOLERANCE, differences


def test_the_reference_continues_the_trained_cycle(exported):
  """The bar is meaningful: the model is trained, so greedy decoding follows the cycle."""
  _, reference = exported
  successor = cycle_successor()
  expected = [successor[PROMPT[-1]]]
  while len(expected) < STEPS:
    expected.append(successor[expected[-1]])
  assert reference['tokens'] == expected


def test_pytorch_module_and_exported_programs_match_jax(exported, tmp_path):
  directory, reference = exported
  model, memory, manifest = to_device.load_export(directory)
  assert manifest['source']['step'] == 36 and manifest['memory']['dtype'] == 'float32'
  assert_matches(reference, *greedy(to_device.Session(model.config, memory, model, model,
                                                      CACHE_LEN)))

  programs = to_device.export_programs(model, memory.dtype, CACHE_LEN)
  assert_matches(reference, *greedy(to_device.Session(
      model.config, memory, programs['prefill'].module(), programs['decode'].module(),
      CACHE_LEN)))


def test_saved_programs_reload_in_a_fresh_process_without_jax(exported, tmp_path):
  directory, reference = exported
  out = tmp_path / 'device'
  # Both fresh processes import only what a phone engineer installs: jax and flax are blocked.
  no_jax = "import sys\nsys.modules['jax'] = sys.modules['flax'] = None\n"
  tool = no_jax + (f"import runpy\nsys.argv = ['export_torch.py', '--memory={directory}', "
                   f"'--out={out}', '--cache_len={CACHE_LEN}', '--no_executorch']\n"
                   "runpy.run_path('tools/export_torch.py', run_name='__main__')\n")
  result = subprocess.run([sys.executable, '-c', tool], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  script = no_jax + f"""
import numpy as np, torch
from meki_jax.export import to_device
model, memory, _ = to_device.load_export({str(directory)!r})
prefill = to_device.load_program({str(out / 'prefill.pt2')!r}).module()
decode = to_device.load_program({str(out / 'decode.pt2')!r}).module()
session = to_device.Session(model.config, memory, prefill, decode, {CACHE_LEN})
prefill_logits, tokens, logits = session.greedy(torch.tensor([{PROMPT}]), {STEPS})
np.savez({str(tmp_path / 'fresh.npz')!r}, prefill_logits=prefill_logits[0].numpy(),
         tokens=tokens[0].numpy(), logits=logits[:, 0].numpy())
"""
  result = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  fresh = np.load(tmp_path / 'fresh.npz')
  assert_matches(reference, fresh['prefill_logits'], fresh['tokens'].tolist(), fresh['logits'])
  device = json.loads((out / 'device.json').read_text())
  assert device['cache_len'] == CACHE_LEN and set(device['files']) == {'prefill', 'decode'}


@pytest.mark.slow
def test_executorch_program_matches_jax(exported, tmp_path):
  directory, reference = exported
  out = tmp_path / 'device'
  to_device.write_device_export(directory, out, cache_len=CACHE_LEN)
  model, memory, _ = to_device.load_export(directory)
  prefill, decode_method = to_device.executorch_runners(out / to_device.PTE)
  assert_matches(reference, *greedy(to_device.Session(model.config, memory, prefill,
                                                      decode_method, CACHE_LEN)))
  assert run_device(directory, out, 'pte') == reference['tokens']
  flip_byte(out / to_device.PTE)
  with pytest.raises(memory_store.ExportError, match='model.pte has sha256 .*corrupted'):
    to_device.device_runners(out, directory, 'pte')


def run_device(directory, device_dir, runtime):
  """The greedy ids tools/run_device.py prints for PROMPT."""
  result = subprocess.run(
      [sys.executable, 'tools/run_device.py', f'--memory={directory}', f'--device={device_dir}',
       f'--runtime={runtime}', f'--token_ids={",".join(map(str, PROMPT))}',
       f'--max_new_tokens={STEPS}'], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  ids_line = next(line for line in result.stdout.splitlines() if line.startswith('ids: '))
  return [int(token) for token in ids_line[len('ids: '):].split(',')]


def test_the_run_tool_generates_the_reference_tokens(exported, tmp_path):
  directory, reference = exported
  to_device.write_device_export(directory, tmp_path / 'device', cache_len=CACHE_LEN,
                                executorch=False)
  assert run_device(directory, tmp_path / 'device', 'pt2') == reference['tokens']


def test_an_existing_device_export_is_kept_without_overwrite(exported, tmp_path):
  directory, _ = exported
  out = tmp_path / 'device'
  out.mkdir()
  (out / 'mine.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    to_device.write_device_export(directory, out, cache_len=8, executorch=False)
  with pytest.raises(FileExistsError, match='is not a device export'):  # not one of ours
    to_device.write_device_export(directory, out, cache_len=8, executorch=False, overwrite=True)
  assert [p.name for p in out.iterdir()] == ['mine.txt']


def test_overwrite_never_deletes_the_memory_export_it_reads(exported):
  directory, _ = exported
  for out in (directory, directory.parent, directory / 'device'):
    with pytest.raises(ValueError, match='an input of this command: write the device export '
                                         'somewhere else'):
      to_device.write_device_export(directory, out, cache_len=8, executorch=False,
                                    overwrite=True)
  memory_store.open_export(directory)  # whole: every file verifies


@pytest.mark.parametrize('dtype, flavor', [
    ('float16', 'paper'), ('bfloat16', 'paper'), ('float16', 'authors_release')])
def test_half_precision_tables_feed_the_programs(tiny_model_config, tmp_path, dtype, flavor):
  """Rows read in the table dtype go into the graph as they are; it computes in fp32 with them,
  so it matches the JAX model fed the same rounded rows. Both model flavors (spec 6a)."""
  config = tiny_model_config(flavor=flavor, qk_norm=flavor == 'paper')
  params = moved_params(config)
  exporter.export_folded(params, config, tmp_path / 'out', dtype=dtype)
  model, memory, _ = to_device.load_export(tmp_path / 'out')
  token_ids = np.array([[5, 17, 3, 88, 41, 9]])
  rows = to_device.memory_rows(memory, token_ids)
  assert rows.dtype == to_device.TORCH_DTYPES[dtype] and rows.shape == (1, 6, 2, 8)

  folded = fold_params(params, config)
  tables = np.asarray(jnp.asarray(folded['layers']['meki'].pop('folded_memory')).astype(dtype)
                      .astype(jnp.float32))  # [L, V, m]
  expected = build_model(config, folded=True).apply({'params': folded}, token_ids,
                                                    memory_rows=tables[:, token_ids])
  prefill = to_device.export_programs(model, dtype, cache_len=8)['prefill'].module()
  logits, _, _ = prefill(torch.from_numpy(token_ids), torch.arange(6), *model.empty_cache(1, 8),
                        rows)
  np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=TOLERANCE)


def test_a_program_that_would_unpickle_is_refused(tiny_model_config, tmp_path):
  config = tiny_model_config(meki=dict(enabled=False))
  exporter.export_folded(moved_params(config), config, tmp_path / 'out')
  model = to_device.load_export(tmp_path / 'out')[0]
  program = torch.export.export(model, to_device.example_inputs(model, None, 1, 1, 4))
  torch.export.save(program, tmp_path / 'pickled.pt2')  # example inputs are saved pickled
  with pytest.raises(ValueError, match='pickled sample inputs; refusing to load'):
    to_device.load_program(tmp_path / 'pickled.pt2')


def flip_byte(path):
  """Flips the bits of the byte in the middle of `path`, in place."""
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0xFF
  path.write_bytes(bytes(data))


@pytest.fixture(scope='module')
def two_bundles(exported, trained_run, tmp_path_factory):
  """Two (memory export, device export) pairs of the trained model: fp32 and fp16 tables."""
  config, workdir, _ = trained_run
  directory, _ = exported
  base = tmp_path_factory.mktemp('bundles')
  other = base / 'memory-fp16'
  exporter.export_checkpoint(workdir, config.model, other, dtype='float16',
                             rows_per_shard=16384)
  for memory_dir, device_dir in ((directory, base / 'device-a'), (other, base / 'device-b')):
    to_device.write_device_export(memory_dir, device_dir, cache_len=CACHE_LEN, executorch=False)
  return (directory, base / 'device-a'), (other, base / 'device-b')


def test_device_json_binds_each_program_to_the_memory_export(two_bundles):
  (memory_a, device_a), (memory_b, _) = two_bundles
  device = to_device.read_device_export(device_a, memory_a, 'pt2')
  assert set(device['files']) == {'prefill', 'decode'}
  for record in device['files'].values():
    assert len(record['sha256']) == 64 and record['bytes'] == (device_a / record['file']).stat(
        ).st_size
  with pytest.raises(memory_store.ExportError, match='the programs belong to another export'):
    to_device.read_device_export(device_a, memory_b, 'pt2')
  with pytest.raises(memory_store.ExportError, match=r"no \['executorch'\] program"):
    to_device.read_device_export(device_a, memory_a, 'pte')


@pytest.mark.parametrize('program', ['prefill.pt2', 'decode.pt2'])
def test_programs_swapped_between_exports_are_refused(two_bundles, tmp_path, program):
  (memory_a, device_a), (_, device_b) = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  shutil.copy(device_b / program, tmp_path / 'device' / program)
  with pytest.raises(memory_store.ExportError,
                     match=f'program {program.split(".")[0]} {program} has .*device.json'):
    to_device.read_device_export(tmp_path / 'device', memory_a, 'pt2')


@pytest.mark.parametrize('program', ['prefill.pt2', 'decode.pt2'])
def test_a_flipped_byte_in_a_program_is_refused(two_bundles, tmp_path, program):
  (memory_a, device_a), _ = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  flip_byte(tmp_path / 'device' / program)
  with pytest.raises(memory_store.ExportError,
                     match=f'{program} has sha256 .*device.json records .*corrupted'):
    to_device.read_device_export(tmp_path / 'device', memory_a, 'pt2')


def test_run_tool_refuses_a_damaged_or_foreign_bundle(two_bundles, tmp_path):
  (memory_a, device_a), (memory_b, _) = two_bundles
  shutil.copytree(device_a, tmp_path / 'device')
  device_json = tmp_path / 'device' / to_device.DEVICE_MANIFEST
  edited = json.loads(device_json.read_text())
  edited['files']['decode']['sha256'] = '0' * 64  # made to match a damaged program
  device_json.write_text(json.dumps(edited))
  with pytest.raises(memory_store.ExportError, match='device.json was edited or damaged'):
    to_device.read_device_export(tmp_path / 'device', memory_a, 'pt2')
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
  """A dense model (no memory_rows input) exports and runs as .pt2 and as .pte, checked."""
  config = tiny_model_config(meki=dict(enabled=False))
  exporter.export_folded(moved_params(config), config, tmp_path / 'dense')
  to_device.write_device_export(tmp_path / 'dense', tmp_path / 'device', cache_len=16)
  model, memory, _ = to_device.load_export(tmp_path / 'dense')
  assert memory is None
  prompt = torch.tensor([[5, 17, 3]])
  expected = to_device.Session(model.config, None, model, model, 16).greedy(prompt, 6)
  for runtime in ('pt2', 'pte'):
    _, prefill, decode_fn = to_device.device_runners(tmp_path / 'device', tmp_path / 'dense',
                                                     runtime)
    logits, tokens, _ = to_device.Session(model.config, None, prefill, decode_fn, 16).greedy(
        prompt, 6)
    assert tokens.tolist() == expected[1].tolist(), runtime
    np.testing.assert_allclose(logits.numpy(), expected[0].numpy(), rtol=0, atol=TOLERANCE)
