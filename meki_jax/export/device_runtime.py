"""Running a device export: its checks, its two runtimes, and the generation loop.

  device, prefill, decode = device_runners('exports/q-device', 'exports/q', 'pte')
  session = Session(memory, prefill, decode, device['cache_len'])
  logits = session.prefill(prompt)        # then session.decode(token) per new token

`read_device_export` trusts nothing it has not checked: device.json's binding digest covers
every field (signature, cache length, logits, table scheme, quantization, files), the memory
export must be the one the programs were built from (its manifest's sha256) and store the
tables in the scheme the programs dequantize, and every program of the bundle must have the
size and sha256 recorded, whichever runtime runs. Imports torch, numpy and tensorstore;
executorch for the .pte.
"""

import json
import pathlib
import zipfile

import torch

from meki_jax import files
from meki_jax.export import device_model, memory_store, to_device
from meki_jax.export.table_quant import SchemeError, TableScheme

RUNTIME_FILES = {'pt2': ('prefill', 'decode'), 'pte': ('executorch',)}  # entries of 'files'


def read_device_export(device_dir, memory_dir, runtime):
  """device.json of `device_dir`, after the checks of the module docstring. Fails naming the
  file and field."""
  files.require_local(device_dir, 'its programs are loaded as local files')
  device_dir, memory_dir = files.path(device_dir), files.path(memory_dir)
  path = device_dir / to_device.DEVICE_MANIFEST
  try:
    device = json.loads(path.read_text())
  except FileNotFoundError as error:
    raise memory_store.ExportError(f'{path} does not exist: not a device export '
                                   '(tools/export_torch.py writes it)') from error
  except json.JSONDecodeError as error:
    raise memory_store.ExportError(f'{path} is not valid JSON: {error}') from error
  if (device.get('format'), device.get('version')) != (to_device.DEVICE_FORMAT,
                                                       to_device.DEVICE_VERSION):
    raise memory_store.ExportError(
        f'{path}: format={device.get("format")!r} version={device.get("version")!r}, expected '
        f'{to_device.DEVICE_FORMAT!r} version {to_device.DEVICE_VERSION}: re-run '
        'tools/export_torch.py')
  if to_device.binding_digest(device) != device.get('binding_sha256'):
    raise memory_store.ExportError(f'{path}: binding_sha256 does not match its fields: '
                                   'device.json was edited or damaged')
  manifest_path = memory_dir / memory_store.MANIFEST
  manifest_sha256 = memory_store.file_record(manifest_path)['sha256']
  if manifest_sha256 != device['source_manifest_sha256']:
    raise memory_store.ExportError(
        f'{path} was exported from a memory export whose manifest.json has sha256 '
        f'{device["source_manifest_sha256"]} ({device.get("source")}); {manifest_path} has '
        f'{manifest_sha256}: the programs belong to another export')
  _check_tables(device, path, memory_store.read_manifest(memory_dir), manifest_path)
  if runtime not in RUNTIME_FILES:
    raise memory_store.ExportError(f'runtime={runtime!r} is not one of {tuple(RUNTIME_FILES)}')
  missing = [name for name in RUNTIME_FILES[runtime] if name not in device['files']]
  if missing:
    raise memory_store.ExportError(f'{path} has no {missing} program for --runtime={runtime} '
                                   f'(exported: {sorted(device["files"])})')
  for name, record in device['files'].items():
    try:
      memory_store.check_file(device_dir, record, f'program {name}')
    except memory_store.ExportError as error:  # the record is device.json's
      raise memory_store.ExportError(
          str(error).replace('manifest.json', to_device.DEVICE_MANIFEST)) from None
  return device


def _check_tables(device, path, manifest, manifest_path):
  """The memory export stores its tables in the scheme the programs dequantize."""
  stored = manifest['memory'] and memory_store.table_scheme(manifest['memory']).record()
  if device.get('tables') != stored:
    raise memory_store.ExportError(
        f'{path} tables={device.get("tables")} but {manifest_path} stores memory.scheme='
        f'{stored}: the programs take their memory inputs in another scheme; re-run '
        'tools/export_torch.py on this memory export')
  if stored is not None:
    try:
      TableScheme.from_record(device['tables'], f'{path} tables')
    except SchemeError as error:
      raise memory_store.ExportError(str(error)) from None


def load_program(path, cache_shapes):
  """A saved .pt2 program (to_device.save_program), after checking that loading it unpickles
  nothing; its cache buffers are allocated again, zero, with the shapes device.json records."""
  with zipfile.ZipFile(path) as archive:
    for name in archive.namelist():
      if name.endswith(('weights_config.json', 'constants_config.json')):
        entries = json.loads(archive.read(name))['config']
        pickled = [key for key, entry in entries.items() if entry.get('use_pickle', True)]
        if pickled:
          raise memory_store.ExportError(f'{path}: {name} stores {pickled} pickled; refusing '
                                         'to load')
      elif '/sample_inputs/' in name and archive.getinfo(name).file_size:
        raise memory_store.ExportError(f'{path}: {name} holds pickled sample inputs; refusing '
                                       'to load')
  device_model.load_custom_ops()
  program = torch.export.load(path)
  for name, shape in cache_shapes.items():
    program.state_dict[name] = torch.zeros(shape)
  return program


def pt2_runners(device_dir, device):
  """(prefill, decode) modules of the .pt2 programs, sharing one set of cache tensors."""
  device_dir, cache = pathlib.Path(device_dir), device['cache']
  prefill, decode = (
      load_program(device_dir / device['files'][name]['file'],
                   {buffer: cache['shape'] for buffer in cache['buffers'][name]}).module()
      for name in to_device.PROGRAMS)
  for name in cache['buffers']['decode']:
    owner, _, attribute = name.rpartition('.')
    decode.get_submodule(owner).register_buffer(attribute, prefill.get_buffer(name),
                                                persistent=False)
  return prefill, decode


def pte_runners(pte_path):
  """(prefill, decode) callables running the methods of a .pte under executorch.runtime.

  The programs compute on ExecuTorch's threadpool (one thread per core); torch, left with
  only the glue of each step (building inputs, an argmax), is set to one intra-op thread:
  its OpenMP threads otherwise spin for milliseconds after every parallel op and take the
  cores the program needs (measured on a 2-core VM, dense-0.6B 8da4w after 1K tokens: 57 ms
  a step with stretches at 100-146 ms, against 45-49 ms with one torch thread).
  """
  torch.set_num_threads(1)
  device_model.load_custom_ops()
  import executorch.kernels.quantized  # noqa: F401  (the quantized embedding's kernels)
  from executorch.runtime import Runtime
  program = Runtime.get().load_program(pathlib.Path(pte_path))
  methods = [program.load_method(name) for name in to_device.PROGRAMS]
  return tuple((lambda method: lambda *inputs: method.execute(list(inputs))[0])(method)
               for method in methods)


def device_runners(device_dir, memory_dir, runtime):
  """(device.json, prefill, decode) of a checked device export (`read_device_export`):
  the programs under ExecuTorch (runtime 'pte') or torch.export ('pt2')."""
  device = read_device_export(device_dir, memory_dir, runtime)
  device_dir = pathlib.Path(device_dir)
  if runtime == 'pte':
    return (device,) + pte_runners(device_dir / device['files']['executorch']['file'])
  return (device,) + pt2_runners(device_dir, device)


class Session:
  """Prefill and decoding over the two programs, whose KV cache lives inside them.

  prefill / decode: callables taking DeviceModel.forward's inputs and returning the logits
  (a DeviceModel itself, `pt2_runners` or `pte_runners`). A token's table rows are read from
  `memory` (FoldedMemory or None) by id before each call, as part of the step. `length` counts
  the cache slots written; a new session over the same programs starts at slot 0 again (slots
  past the current position are never read).
  """

  def __init__(self, memory, prefill, decode, cache_len):
    self.memory, self.prefill_fn, self.decode_fn = memory, prefill, decode
    self.cache_len = cache_len
    self.length = 0

  def _run(self, function, token_ids):
    token_ids = torch.as_tensor(token_ids, dtype=torch.int64)  # [b, t]
    if self.length + token_ids.shape[1] > self.cache_len:
      raise ValueError(f'{self.length} cached + {token_ids.shape[1]} new tokens exceed '
                       f'cache_len={self.cache_len}')
    inputs = (token_ids, torch.tensor([self.length], dtype=torch.int64),
              *to_device.memory_inputs(self.memory, token_ids))
    logits = function(*inputs)
    self.length += token_ids.shape[1]
    return logits

  def prefill(self, token_ids):
    """token_ids [b, t] with t >= 2 -> logits [b, t | 1, vocab] (the programs' `logits`)."""
    return self._run(self.prefill_fn, token_ids)

  def decode(self, token_ids):
    """token_ids [b] -> logits [b, vocab] of the next token."""
    return self._run(self.decode_fn, torch.as_tensor(token_ids)[:, None])[:, -1]

  def greedy(self, prompt, steps):
    """Prefills `prompt` [b, t] and picks `steps` tokens by argmax. Returns (prefill logits,
    tokens [b, steps], the logits each token was chosen from [steps, b, vocab])."""
    prefill_logits = self.prefill(prompt)
    chosen = [prefill_logits[:, -1]]
    tokens = [chosen[0].argmax(-1)]
    while len(tokens) < steps:
      chosen.append(self.decode(tokens[-1]))
      tokens.append(chosen[-1].argmax(-1))
    return prefill_logits, torch.stack(tokens, dim=1), torch.stack(chosen)
