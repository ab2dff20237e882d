"""The issue's bar, on a small trained model: the exported programs (.pt2 in this and in a fresh
process, .pte under executorch.runtime), with their KV cache inside, give the JAX folded model's
logits for a prefill and 32 greedy decode steps, and the same tokens; quantized tables and
backbones are exported, recorded and run."""

import json
import subprocess
import sys
import zipfile

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from meki_jax.export import device_runtime, exporter, table_quant, to_device
from meki_jax.fold import fold_params
from meki_jax.model.transformer import build_model
from tests.export.conftest import CACHE_LEN, PROMPT, STEPS, cycle_successor, moved_params

# fp32 on both sides; they differ in summation order only (measured ~2e-6 on logits ~±20).
TOLERANCE = 1e-4


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


def write(directory, out, **kwargs):
  """write_device_export with the tests' cache length and every position's logits."""
  kwargs.setdefault('logits', 'all')
  return to_device.write_device_export(directory, out, cache_len=CACHE_LEN, **kwargs)


def test_the_reference_continues_the_trained_cycle(exported):
  """The bar is meaningful: the model is trained, so greedy decoding follows the cycle."""
  _, reference = exported
  successor = cycle_successor()
  expected = [successor[PROMPT[-1]]]
  while len(expected) < STEPS:
    expected.append(successor[expected[-1]])
  assert reference['tokens'] == expected


def test_programs_with_the_cache_inside_match_jax(exported, tmp_path):
  """The exported prefill and decode programs, sharing their cache buffers, before saving."""
  directory, reference = exported
  model, memory, manifest = to_device.load_export(directory)
  assert manifest['source']['step'] == 36 and manifest['memory']['scheme'] == {'name': 'float32'}
  device = to_device.device_model.build_device_model(
      model, cache_len=CACHE_LEN, scheme=memory.scheme, logits='all')
  programs = to_device.export_programs(device, CACHE_LEN)
  assert to_device.cache_buffers(programs['prefill']) == to_device.cache_buffers(
      programs['decode']) and len(to_device.cache_buffers(programs['decode'])) == 2 * 2
  prefill, decode_program = programs['prefill'].module(), programs['decode'].module()
  for name in to_device.cache_buffers(programs['decode']):  # what pt2_runners does on load
    owner, _, attribute = name.rpartition('.')
    decode_program.get_submodule(owner).register_buffer(attribute, prefill.get_buffer(name))
  assert_matches(reference, *greedy(device_runtime.Session(memory, prefill, decode_program,
                                                           CACHE_LEN)))


def test_saved_programs_reload_in_a_fresh_process_without_jax(exported, tmp_path):
  directory, reference = exported
  out = tmp_path / 'device'
  # Both fresh processes import only what a phone engineer installs: jax and flax are blocked.
  no_jax = "import sys\nsys.modules['jax'] = sys.modules['flax'] = None\n"
  tool = no_jax + (f"import runpy\nsys.argv = ['export_torch.py', '--memory={directory}', "
                   f"'--out={out}', '--cache_len={CACHE_LEN}', '--formats=pt2', '--logits=all']\n"
                   "runpy.run_path('tools/export_torch.py', run_name='__main__')\n")
  result = subprocess.run([sys.executable, '-c', tool], capture_output=True, text=True)
  assert result.returncode == 0, result.stderr[-3000:]
  script = no_jax + f"""
import numpy as np, torch
from meki_jax.export import device_runtime, memory_store
device, prefill, decode = device_runtime.device_runners({str(out)!r}, {str(directory)!r}, 'pt2')
_, memory = memory_store.open_export({str(directory)!r})
session = device_runtime.Session(memory, prefill, decode, device['cache_len'])
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
  # The cache's contents are not saved: each buffer is stored as one float.
  for name in ('prefill', 'decode'):
    stored = stored_weight_sizes(out / f'{name}.pt2')
    assert [stored[buffer] for buffer in device['cache']['buffers'][name]] == [4] * 4


def stored_weight_sizes(path):
  """{weight name: bytes stored} of a .pt2 archive."""
  with zipfile.ZipFile(path) as archive:
    config_name, = [name for name in archive.namelist()
                    if name.endswith('weights_config.json')]
    folder = config_name.rsplit('/', 1)[0]
    entries = json.loads(archive.read(config_name))['config']
    return {name: archive.getinfo(f'{folder}/{entry["path_name"]}').file_size
            for name, entry in entries.items()}


@pytest.mark.slow
def test_executorch_program_matches_jax(exported, tmp_path):
  directory, reference = exported
  out = tmp_path / 'device'
  write(directory, out, formats=('pte',))
  _, memory = to_device.memory_store.open_export(directory)
  prefill, decode_method = device_runtime.pte_runners(out / to_device.PTE)
  assert_matches(reference, *greedy(device_runtime.Session(memory, prefill, decode_method,
                                                           CACHE_LEN)))
  assert run_device(directory, out, 'pte') == reference['tokens']


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
  write(directory, tmp_path / 'device', formats=('pt2',), logits='last')
  assert run_device(directory, tmp_path / 'device', 'pt2') == reference['tokens']


def test_an_existing_device_export_is_kept_without_overwrite(exported, tmp_path):
  directory, _ = exported
  out = tmp_path / 'device'
  out.mkdir()
  (out / 'mine.txt').write_text('keep me')
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    to_device.write_device_export(directory, out, cache_len=8, formats=('pt2',))
  with pytest.raises(FileExistsError, match='is not a device export'):  # not one of ours
    to_device.write_device_export(directory, out, cache_len=8, formats=('pt2',), overwrite=True)
  assert [p.name for p in out.iterdir()] == ['mine.txt']


def test_overwrite_never_deletes_the_memory_export_it_reads(exported):
  directory, _ = exported
  for out in (directory, directory.parent, directory / 'device'):
    with pytest.raises(ValueError, match='an input of this command: write the device export '
                                         'somewhere else'):
      to_device.write_device_export(directory, out, cache_len=8, formats=('pt2',),
                                    overwrite=True)
  to_device.memory_store.open_export(directory)  # whole: every file verifies



def test_a_group_size_xnnpack_cannot_run_is_refused_before_any_work(tmp_path):
  with pytest.raises(ValueError, match=r'--group_size=16: XNNPACK runs 8da4w only in groups of '
                                       r'a multiple of 32 \(--formats=pt2 takes any'):
    to_device.write_device_export(tmp_path / 'no-export-here', tmp_path / 'device', cache_len=8,
                                  qlinear='8da4w', group_size=16)
  with pytest.raises(ValueError, match='--group_size=0: weights per scale must be at least 1'):
    to_device.write_device_export(tmp_path / 'no-export-here', tmp_path / 'device', cache_len=8,
                                  qlinear='8da4w', group_size=0, formats=('pt2',))

@pytest.mark.parametrize('dtype, flavor', [
    ('float16', 'paper'), ('bfloat16', 'paper'), ('float16', 'authors_release'),
    ('int8', 'paper'), ('int4', 'paper')])
def test_stored_tables_feed_the_programs(tiny_model_config, tmp_path, dtype, flavor):
  """Rows read in the stored scheme go into the program as they are; it dequantizes and
  computes in fp32, so it matches the JAX model fed the same dequantized rows. Both flavors."""
  config = tiny_model_config(flavor=flavor, qk_norm=flavor == 'paper')
  params = moved_params(config)
  exporter.export_folded(params, config, tmp_path / 'out', dtype=dtype, table_group_size=4)
  model, memory, manifest = to_device.load_export(tmp_path / 'out')
  scheme = table_quant.TableScheme(dtype, 4 if dtype == 'int4' else 0)
  assert memory.scheme == scheme and manifest['memory']['scheme'] == scheme.record()
  token_ids = np.array([[5, 17, 3, 88, 41, 9]])
  inputs = to_device.memory_inputs(memory, token_ids)
  signature = to_device.memory_signature(model.config, scheme, 1)
  assert [(tensor.dtype, list(tensor.shape)) for tensor in inputs] == [
      (to_device.TORCH_DTYPES[entry['dtype']], [1, 6] + entry['shape'][2:])
      for entry in signature]

  folded = fold_params(params, config)
  tables = np.asarray(folded['layers']['meki'].pop('folded_memory'))  # [L, V, m]
  rows = scheme.decode(scheme.encode(np.moveaxis(tables[:, token_ids], 0, 2)), 8)  # [b, t, L, m]
  if dtype in table_quant.FLOAT_SCHEMES:  # the float schemes round as JAX does
    np.testing.assert_array_equal(rows, np.asarray(
        jnp.asarray(tables[:, token_ids]).astype(dtype).astype(jnp.float32)).transpose(1, 2, 0, 3))
  expected = build_model(config, folded=True).apply({'params': folded}, token_ids,
                                                    memory_rows=np.moveaxis(rows, 2, 0))
  device = to_device.device_model.build_device_model(model, cache_len=8, scheme=scheme,
                                                     logits='all')
  prefill = to_device.export_programs(device, cache_len=8)['prefill'].module()
  logits = prefill(torch.from_numpy(token_ids), torch.tensor([0]), *inputs)
  np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=TOLERANCE)


def test_a_dense_model_exports_programs_without_memory_inputs(tiny_model_config, tmp_path):
  config = tiny_model_config(meki=dict(enabled=False))
  exporter.export_folded(moved_params(config), config, tmp_path / 'dense')
  model, memory, _ = to_device.load_export(tmp_path / 'dense')
  assert memory is None
  token_ids = torch.tensor([[5, 17, 3, 88]])
  with torch.no_grad():
    expected, _, _ = model(token_ids, torch.arange(4), *model.empty_cache(1, 8))
  device = to_device.device_model.build_device_model(model, cache_len=8, logits='all')
  programs = to_device.export_programs(device, cache_len=8)
  assert [spec.arg.name for spec in programs['decode'].graph_signature.input_specs
          if spec.kind.name == 'USER_INPUT'] == ['token_ids', 'start_pos']
  logits = programs['prefill'].module()(token_ids, torch.tensor([0]))
  np.testing.assert_allclose(logits.numpy(), expected.numpy(), rtol=0, atol=TOLERANCE)


def test_a_program_that_would_unpickle_is_refused(tiny_model_config, tmp_path):
  config = tiny_model_config(meki=dict(enabled=False))
  exporter.export_folded(moved_params(config), config, tmp_path / 'out')
  model = to_device.load_export(tmp_path / 'out')[0]
  program = torch.export.export(model, (torch.zeros((1, 1), dtype=torch.int64),
                                        torch.zeros(1, dtype=torch.int64),
                                        *model.empty_cache(1, 4)))
  torch.export.save(program, tmp_path / 'pickled.pt2')  # example inputs are saved pickled
  with pytest.raises(ValueError, match='pickled sample inputs; refusing to load'):
    device_runtime.load_program(tmp_path / 'pickled.pt2', {})


@pytest.mark.slow
def test_a_quantized_bundle_runs_under_both_runtimes_and_keeps_the_cycle(exported, trained_run,
                                                                         tmp_path):
  """int8 tables, 8da4w linears and an 8-bit embedding: the trained cycle survives (the model
  is certain of its next token), under ExecuTorch and torch.export alike."""
  config, workdir, _ = trained_run
  _, reference = exported
  memory_dir = tmp_path / 'memory-int8'
  exporter.export_checkpoint(workdir, config.model, memory_dir, dtype='int8',
                             rows_per_shard=16384)
  device = write(memory_dir, tmp_path / 'device', qlinear='8da4w', group_size=32,
                 qembedding='8w', logits='last')
  assert device['quantization'] == {'linear': '8da4w', 'group_size': 32, 'embedding': '8w'}
  assert device['tables']['name'] == 'int8' and [entry['dtype'] for entry in device[
      'signature']['inputs']] == ['int64', 'int64', 'int8', 'float16']
  for runtime in ('pte', 'pt2'):
    assert run_device(memory_dir, tmp_path / 'device', runtime) == reference['tokens'], runtime
