"""The PyTorch side of the export: an export directory -> a PyTorch model, `torch.export`
programs (prefill, single-token decode) and an ExecuTorch program for phones.

  model, memory, manifest = load_export('exports/quickstart')   # validated, no unpickling
  write_device_export('exports/quickstart', 'exports/quickstart-device', cache_len=512)

The folded tables stay outside the graph: `memory_rows` gathers a token's rows for every layer
from the tensorstore shards (as a phone reads them from flash) and the programs take them as an
input. Inputs and outputs of both programs are those of `torch_model.MekiForCausalLM.forward`;
`device.json` in the output records them. Imports torch, safetensors, numpy and tensorstore,
never jax or flax; executorch only when a .pte is lowered.
"""

import hashlib
import json
import pathlib
import zipfile

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from meki_jax import files
from meki_jax.export import backbone, memory_store
from meki_jax.export.torch_model import MekiForCausalLM

TORCH_DTYPES = {'float32': torch.float32, 'float16': torch.float16,
                'bfloat16': torch.bfloat16}
PROGRAMS = ('prefill', 'decode')
DEVICE_MANIFEST = 'device.json'
DEVICE_FORMAT = 'meki-device'
DEVICE_VERSION = 2  # 2: device.json binds each program's sha256 to the memory manifest's
PTE = 'model.pte'
RUNTIME_FILES = {'pt2': ('prefill', 'decode'), 'pte': ('executorch',)}  # entries of 'files'
DEVICE_EXPORT = files.Kind('device export', manifest=DEVICE_MANIFEST, format=DEVICE_FORMAT)
# The shortest prefill chunk: torch.export specialises a dynamic dimension seen as 1, so a
# single token (a one-token prompt, or the last one of an odd chunking) goes to `decode`.
MIN_PREFILL = 2


def load_export(directory, verify_checksums=True):
  """(MekiForCausalLM in eval mode, FoldedMemory or None, manifest) of an export directory.

  Everything is validated first (memory_store.open_export, backbone.check_backbone); the weights
  are read with safetensors, never unpickled. The model computes in float32.
  """
  directory = pathlib.Path(directory)
  manifest, memory = memory_store.open_export(directory, verify_checksums)
  config = manifest['model_config']
  backbone_path = directory / manifest['backbone']['file']
  backbone.check_backbone(backbone_path, config, manifest['backbone']['dtype'])
  model = MekiForCausalLM(config)
  state = {name: tensor.float() for name, tensor in load_file(str(backbone_path)).items()}
  model.load_state_dict(state, strict=True)
  model.eval().requires_grad_(False)
  return model, memory, manifest


def memory_rows(memory, token_ids):
  """token_ids [b, t] -> M~ rows [b, t, num_layers, d_mem] as a torch tensor of the table dtype."""
  rows = memory.rows(np.asarray(token_ids))
  if memory.dtype == 'bfloat16':  # numpy has no bfloat16 torch can take: pass the bits
    return torch.from_numpy(rows.view(np.int16)).view(torch.bfloat16)
  return torch.from_numpy(np.ascontiguousarray(rows))


def example_inputs(model, memory_dtype, batch, seq, cache_len):
  """Inputs of `model.forward` for `seq` new tokens, as the programs are traced with."""
  config = model.config
  inputs = (torch.zeros((batch, seq), dtype=torch.int64), torch.arange(seq, dtype=torch.int64),
            *model.empty_cache(batch, cache_len))
  if model.uses_memory:
    inputs += (torch.zeros((batch, seq, config['num_layers'], config['meki']['d_mem']),
                           dtype=TORCH_DTYPES[memory_dtype]),)
  return inputs


def export_programs(model, memory_dtype, cache_len, batch=1):
  """{'prefill': ExportedProgram with dynamic length in [2, cache_len], 'decode': one token}."""
  if cache_len < MIN_PREFILL:
    raise ValueError(f'cache_len={cache_len} must be at least {MIN_PREFILL}')
  seq = torch.export.Dim.DYNAMIC(min=MIN_PREFILL, max=cache_len)
  prefill_shapes = ({1: seq}, {0: seq}, None, None) + (({1: seq},) if model.uses_memory else ())
  programs = {
      'prefill': torch.export.export(
          model, example_inputs(model, memory_dtype, batch, MIN_PREFILL + 1, cache_len),
          dynamic_shapes=prefill_shapes),
      'decode': torch.export.export(model, example_inputs(model, memory_dtype, batch, 1,
                                                          cache_len)),
  }
  for program in programs.values():
    program.example_inputs = None  # saved with pickle otherwise; the signature says it all
  return programs


def lower_to_executorch(programs):
  """The programs lowered for CPU with the XNNPACK partitioner: the .pte bytes (two methods)."""
  from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
  from executorch.exir import to_edge_transform_and_lower
  edge = to_edge_transform_and_lower(dict(programs), partitioner=[XnnpackPartitioner()])
  return edge.to_executorch().buffer


def load_program(path):
  """A saved .pt2 program, after checking that loading it unpickles nothing."""
  with zipfile.ZipFile(path) as archive:
    for name in archive.namelist():
      if name.endswith(('weights_config.json', 'constants_config.json')):
        entries = json.loads(archive.read(name))['config']
        pickled = [key for key, entry in entries.items() if entry.get('use_pickle', True)]
        if pickled:
          raise ValueError(f'{path}: {name} stores {pickled} pickled; refusing to load')
      elif '/sample_inputs/' in name and archive.getinfo(name).file_size:
        raise ValueError(f'{path}: {name} holds pickled sample inputs; refusing to load')
  return torch.export.load(path)


def _signature(model, memory_dtype, cache_len, batch):
  config = model.config
  cache = list(model.cache_shape(batch, cache_len))
  inputs = [{'name': 'token_ids', 'shape': [batch, 't'], 'dtype': 'int64'},
            {'name': 'positions', 'shape': ['t'], 'dtype': 'int64'},
            {'name': 'key_cache', 'shape': cache, 'dtype': 'float32'},
            {'name': 'value_cache', 'shape': cache, 'dtype': 'float32'}]
  if model.uses_memory:
    inputs.append({'name': 'memory_rows', 'dtype': memory_dtype, 'shape': [
        batch, 't', config['num_layers'], config['meki']['d_mem']]})
  outputs = [{'name': 'logits', 'shape': [batch, 't', config['vocab_size']], 'dtype': 'float32'},
             {'name': 'key_cache', 'shape': cache, 'dtype': 'float32'},
             {'name': 'value_cache', 'shape': cache, 'dtype': 'float32'}]
  return {'inputs': inputs, 'outputs': outputs,
          't': {'prefill': [MIN_PREFILL, cache_len], 'decode': [1, 1]}}


def write_device_export(directory, out, *, cache_len, batch=1, executorch=True, overwrite=False,
                        verify_checksums=True):
  """Writes prefill.pt2, decode.pt2, model.pte (with `executorch`) and device.json to `out`.

  `out` is assembled beside it and swapped into place (files.replacing): an existing `out` is
  replaced only with `overwrite`, only if it is a device export, and never if it is, contains
  or lies inside the memory export `directory`. Returns the device manifest.
  """
  out = pathlib.Path(out)
  files.check_output(out, DEVICE_EXPORT, overwrite=overwrite, sources=(directory,))
  steps = ['check and load the export', 'torch.export prefill and decode', 'save .pt2']
  steps += ['lower to ExecuTorch (XNNPACK)'] if executorch else []
  with tqdm(total=len(steps), desc='export_torch', unit='step') as progress:
    def step(number):
      progress.update(number - progress.n)
      progress.set_postfix_str(steps[number] if number < len(steps) else 'done')
    step(0)
    model, memory, manifest = load_export(directory, verify_checksums)
    memory_dtype = memory.dtype if memory is not None else None
    step(1)
    programs = export_programs(model, memory_dtype, cache_len, batch)
    step(2)
    with files.replacing(out, DEVICE_EXPORT, overwrite=overwrite,
                         sources=(directory,)) as temporary:
      program_files = {}
      for name, program in programs.items():
        torch.export.save(program, temporary / f'{name}.pt2')
        program_files[name] = f'{name}.pt2'
      if executorch:
        step(3)
        (temporary / PTE).write_bytes(lower_to_executorch(programs))
        program_files['executorch'] = PTE
      step(len(steps))
      device = {'format': DEVICE_FORMAT, 'version': DEVICE_VERSION,
                'source': str(pathlib.Path(directory).absolute()),
                'source_manifest_sha256': memory_store.file_record(
                    pathlib.Path(directory) / memory_store.MANIFEST)['sha256'],
                'cache_len': cache_len, 'batch': batch,
                'files': {name: {'file': file, **memory_store.file_record(temporary / file)}
                          for name, file in program_files.items()},
                'signature': _signature(model, memory_dtype, cache_len, batch)}
      device['binding_sha256'] = binding_digest(device)
      (temporary / DEVICE_MANIFEST).write_text(json.dumps(device, indent=1) + '\n')
  return device


def binding_digest(device):
  """sha256 over the memory manifest's sha256 and every program's (name, file, bytes, sha256):
  what ties the programs of a device export to one memory export."""
  bound = {'source_manifest_sha256': device['source_manifest_sha256'],
           'files': device['files']}
  return hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()


def read_device_export(device_dir, memory_dir, runtime):
  """device.json of `device_dir`, after checking that it belongs to the memory export in
  `memory_dir` (its manifest.json's sha256) and that the programs `runtime` (pt2 | pte) runs are
  the ones exported with it, whole and unaltered (size and sha256). Fails naming the file."""
  device_dir, memory_dir = pathlib.Path(device_dir), pathlib.Path(memory_dir)
  path = device_dir / DEVICE_MANIFEST
  try:
    device = json.loads(path.read_text())
  except FileNotFoundError as error:
    raise memory_store.ExportError(f'{path} does not exist: not a device export '
                                   '(tools/export_torch.py writes it)') from error
  except json.JSONDecodeError as error:
    raise memory_store.ExportError(f'{path} is not valid JSON: {error}') from error
  if (device.get('format'), device.get('version')) != (DEVICE_FORMAT, DEVICE_VERSION):
    raise memory_store.ExportError(
        f'{path}: format={device.get("format")!r} version={device.get("version")!r}, expected '
        f'{DEVICE_FORMAT!r} version {DEVICE_VERSION}: re-run tools/export_torch.py')
  if binding_digest(device) != device.get('binding_sha256'):
    raise memory_store.ExportError(f'{path}: binding_sha256 does not match its files and '
                                   'source_manifest_sha256: device.json was edited or damaged')
  manifest_sha256 = memory_store.file_record(memory_dir / memory_store.MANIFEST)['sha256']
  if manifest_sha256 != device['source_manifest_sha256']:
    raise memory_store.ExportError(
        f'{path} was exported from a memory export whose manifest.json has sha256 '
        f'{device["source_manifest_sha256"]} ({device.get("source")}); '
        f'{memory_dir / memory_store.MANIFEST} has {manifest_sha256}: the programs belong to '
        'another export')
  missing = [name for name in RUNTIME_FILES[runtime] if name not in device['files']]
  if missing:
    raise memory_store.ExportError(f'{path} has no {missing} program for --runtime={runtime} '
                                   f'(exported: {sorted(device["files"])})')
  for name in RUNTIME_FILES[runtime]:
    _check_program(device_dir, device['files'][name], name)
  return device


def _check_program(device_dir, record, name):
  try:
    memory_store.check_file(device_dir, record, f'program {name}')
  except memory_store.ExportError as error:  # the record is device.json's, not manifest.json's
    raise memory_store.ExportError(str(error).replace('manifest.json', DEVICE_MANIFEST)) from None


def device_runners(device_dir, memory_dir, runtime):
  """(device.json, prefill, decode) of a checked device export (`read_device_export`):
  the programs under torch.export (runtime 'pt2') or ExecuTorch ('pte')."""
  device = read_device_export(device_dir, memory_dir, runtime)
  device_dir = pathlib.Path(device_dir)
  if runtime == 'pte':
    return (device,) + executorch_runners(device_dir / device['files']['executorch']['file'])
  return (device,) + tuple(load_program(device_dir / device['files'][name]['file']).module()
                           for name in PROGRAMS)


class Session:
  """Prefill and greedy decoding with a KV cache over any runner of the two programs.

  prefill / decode: callables taking MekiForCausalLM.forward's inputs and returning (logits,
  key_cache, value_cache) — the module itself, `ExportedProgram.module()`, or an ExecuTorch
  method (see `executorch_runners`). Rows of M~ are gathered from `memory` before each call.
  """

  def __init__(self, model_config, memory, prefill, decode, cache_len, batch=1):
    self.memory, self.prefill_fn, self.decode_fn = memory, prefill, decode
    shape = (model_config['num_layers'], batch, model_config['num_kv_heads'], cache_len,
             model_config['head_dim'])
    self.key_cache, self.value_cache = torch.zeros(shape), torch.zeros(shape)
    self.length = 0  # cache slots written

  def _run(self, function, token_ids):
    token_ids = torch.as_tensor(token_ids, dtype=torch.int64)  # [b, t]
    if self.length + token_ids.shape[1] > self.key_cache.shape[3]:
      raise ValueError(f'{self.length} cached + {token_ids.shape[1]} new tokens exceed '
                       f'cache_len={self.key_cache.shape[3]}')
    positions = torch.arange(self.length, self.length + token_ids.shape[1], dtype=torch.int64)
    inputs = [token_ids, positions, self.key_cache, self.value_cache]
    if self.memory is not None:
      inputs.append(memory_rows(self.memory, token_ids))
    logits, self.key_cache, self.value_cache = function(*inputs)[:3]
    self.length += token_ids.shape[1]
    return logits

  def prefill(self, token_ids):
    """token_ids [b, t] with t >= 2 -> logits [b, t, vocab]."""
    return self._run(self.prefill_fn, token_ids)

  def decode(self, token_ids):
    """token_ids [b] -> logits [b, vocab] of the next token."""
    return self._run(self.decode_fn, torch.as_tensor(token_ids)[:, None])[:, 0]

  def greedy(self, prompt, steps):
    """Prefills `prompt` [b, t] and picks `steps` tokens by argmax. Returns (prefill logits
    [b, t, vocab], tokens [b, steps], the logits each token was chosen from [steps, b, vocab])."""
    prefill_logits = self.prefill(prompt)
    chosen = [prefill_logits[:, -1]]
    tokens = [chosen[0].argmax(-1)]
    while len(tokens) < steps:
      chosen.append(self.decode(tokens[-1]))
      tokens.append(chosen[-1].argmax(-1))
    return prefill_logits, torch.stack(tokens, dim=1), torch.stack(chosen)


def executorch_runners(pte_path):
  """(prefill, decode) callables running the methods of a .pte under executorch.runtime."""
  from executorch.runtime import Runtime
  program = Runtime.get().load_program(pathlib.Path(pte_path))
  methods = {name: program.load_method(name) for name in PROGRAMS}
  return tuple((lambda method: lambda *inputs: method.execute(list(inputs)))(methods[name])
               for name in PROGRAMS)
