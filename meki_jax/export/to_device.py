"""The PyTorch side of the export: an export directory -> on-device programs.

  model, memory, manifest = load_export('exports/quickstart')   # validated, no unpickling
  write_device_export('exports/quickstart', 'exports/quickstart-device', cache_len=512,
                      qlinear='8da4w', qembedding='8w')

Two programs share one KV cache held inside them (export/device_model.py): `prefill` (2 to
cache_len tokens) and `decode` (one token). They are written as one ExecuTorch program
`model.pte` (two methods lowered for CPU with XNNPACK, the cache a mutable buffer both methods
share) and as torch.export programs `prefill.pt2` and `decode.pt2`. The folded tables stay
outside the graphs: the application reads a token's rows from memory.zarr (as a phone reads
flash) and passes them in. `device.json` records the signature, settings and files, bound to
the memory export (export/device_runtime.py checks it before anything runs). Imports torch,
safetensors, numpy and tensorstore, never jax or flax; executorch and torchao when they are used.
"""

import hashlib
import json

import numpy as np
import torch
from safetensors.torch import load_file
from tqdm import tqdm

from meki_jax import files
from meki_jax.export import backbone, device_model, memory_store
from meki_jax.export.torch_model import MekiForCausalLM

TORCH_DTYPES = {'float32': torch.float32, 'float16': torch.float16,
                'bfloat16': torch.bfloat16, 'int8': torch.int8, 'uint8': torch.uint8}
PROGRAMS = ('prefill', 'decode')
FORMATS = ('pte', 'pt2')
DEVICE_MANIFEST = 'device.json'
DEVICE_FORMAT = 'meki-device'
# 3: the KV cache inside the programs, quantization, the binding covers every field
DEVICE_VERSION = 3
PTE = 'model.pte'
XNNPACK_GROUP = 32  # its 8da4w kernels take weight groups of a multiple of 32 values
DEVICE_EXPORT = files.Kind('device export', manifest=DEVICE_MANIFEST, format=DEVICE_FORMAT)
# The shortest prefill: torch.export specialises a dynamic dimension seen as 1, so a single
# token (a one-token prompt, or the last one of an odd chunking) goes to `decode`.
MIN_PREFILL = 2


def load_export(directory, verify_checksums=True):
  """(MekiForCausalLM in eval mode, FoldedMemory or None, manifest) of an export directory.

  Everything is validated first (memory_store.open_export, backbone.check_backbone); the weights
  are read with safetensors, never unpickled. The model computes in float32.
  """
  directory = files.path(directory)
  manifest, memory = memory_store.open_export(directory, verify_checksums)
  config = manifest['model_config']
  with files.local_copy(directory / manifest['backbone']['file']) as backbone_path:
    backbone.check_backbone(backbone_path, config, manifest['backbone']['dtype'])
    tensors = load_file(str(backbone_path))
  model = MekiForCausalLM(config)
  state = {name: tensor.float() for name, tensor in tensors.items()}
  model.load_state_dict(state, strict=True)
  model.eval().requires_grad_(False)
  return model, memory, manifest


def memory_inputs(memory, token_ids):
  """token_ids [b, t] -> the programs' memory inputs, torch tensors (table_quant.split); () for
  a dense model."""
  if memory is None:
    return ()
  arrays = memory.program_inputs(np.asarray(token_ids))
  if memory.scheme.name == 'bfloat16':  # numpy has no bfloat16 torch takes: pass the bits
    return (torch.from_numpy(arrays[0].view(np.int16)).view(torch.bfloat16),)
  return tuple(torch.from_numpy(np.ascontiguousarray(array)) for array in arrays)


def memory_signature(config, scheme, batch):
  """[{'name', 'dtype', 'shape'}] of the memory inputs ('t' = the new tokens)."""
  if scheme is None:
    return []
  layers, d_mem = config['num_layers'], config['meki']['d_mem']
  if not scheme.quantized:
    return [{'name': 'memory_rows', 'dtype': scheme.name, 'shape': [batch, 't', layers, d_mem]}]
  values = d_mem if scheme.name == 'int8' else d_mem // 2
  return [{'name': 'memory_rows', 'dtype': 'int8' if scheme.name == 'int8' else 'uint8',
           'shape': [batch, 't', layers, values]},
          {'name': 'memory_scales', 'dtype': 'float16',
           'shape': [batch, 't', layers, scheme.scales_per_row(d_mem)]}]


def signature(config, scheme, batch, cache_len, logits):
  """The programs' inputs and outputs, as device.json records them."""
  inputs = [{'name': 'token_ids', 'shape': [batch, 't'], 'dtype': 'int64'},
            {'name': 'start_pos', 'shape': [1], 'dtype': 'int64'}]
  inputs += memory_signature(config, scheme, batch)
  logits_shape = [batch, 't' if logits == 'all' else 1, config['vocab_size']]
  return {'inputs': inputs, 'outputs': [{'name': 'logits', 'shape': logits_shape,
                                         'dtype': 'float32'}],
          't': {'prefill': [MIN_PREFILL, cache_len], 'decode': [1, 1]}}


def example_inputs(config, scheme, batch, seq):
  """Zero inputs of DeviceModel.forward for `seq` new tokens at position 0."""
  inputs = [torch.zeros((batch, seq), dtype=torch.int64), torch.zeros(1, dtype=torch.int64)]
  for entry in memory_signature(config, scheme, batch):
    shape = [seq if size == 't' else size for size in entry['shape']]
    inputs.append(torch.zeros(shape, dtype=TORCH_DTYPES[entry['dtype']]))
  return tuple(inputs)


def export_programs(model, cache_len, batch=1):
  """{'prefill': ExportedProgram with t in [2, cache_len], 'decode': t = 1} of a DeviceModel.

  Both programs mutate the model's cache buffers in place (buffers_to_mutate)."""
  if cache_len < MIN_PREFILL:
    raise ValueError(f'cache_len={cache_len} must be at least {MIN_PREFILL}')
  device_model.load_custom_ops()
  seq = torch.export.Dim('t', min=MIN_PREFILL, max=cache_len)
  prefill_inputs = example_inputs(model.config, model.scheme, batch, MIN_PREFILL + 1)
  memory_shapes = tuple({1: seq} for _ in prefill_inputs[2:])  # *memory: none when dense
  prefill_shapes = ({1: seq}, None) + ((memory_shapes,) if memory_shapes else ())
  with torch.no_grad():
    programs = {
        'prefill': torch.export.export(model, prefill_inputs, dynamic_shapes=prefill_shapes),
        'decode': torch.export.export(model, example_inputs(model.config, model.scheme, batch,
                                                            1)),
    }
  for program in programs.values():
    program.example_inputs = None  # saved with pickle otherwise; the signature says it all
  return programs


def lower_to_executorch(programs):
  """The programs lowered for CPU with the XNNPACK partitioner: the .pte bytes (two methods
  sharing one copy of the cache buffers, planned once; inputs are not copied in)."""
  from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
  from executorch.exir import (EdgeCompileConfig, ExecutorchBackendConfig,
                               to_edge_transform_and_lower)
  from executorch.exir.passes import MemoryPlanningPass
  edge = to_edge_transform_and_lower(
      dict(programs), partitioner=[XnnpackPartitioner()],
      compile_config=EdgeCompileConfig(_check_ir_validity=False, _skip_dim_order=True))
  planning = MemoryPlanningPass(alloc_graph_input=False, share_mutable_buffers=True)
  return edge.to_executorch(ExecutorchBackendConfig(
      extract_delegate_segments=True, do_quant_fusion_and_const_prop=True,
      memory_planning_pass=planning, emit_mutable_buffer_names=True)).buffer


def save_program(program, path):
  """Saves a .pt2 without its cache buffers' contents (zeros, cache_len slots per layer): they
  are replaced by one-element views while saving, and `device_runtime.load_program` allocates
  them again from the shape device.json records."""
  state = dict(program.state_dict)
  try:
    for name in cache_buffers(program):
      program.state_dict[name] = torch.zeros(1).expand(state[name].shape)
    torch.export.save(program, path)
  finally:
    program.state_dict.update(state)


def cache_buffers(program):
  """The names of a program's KV-cache buffers (a DeviceModel has no other buffers; the custom
  ops update them in place, so they are not in the signature's buffers_to_mutate)."""
  from torch.export.graph_signature import InputKind
  names = sorted(spec.target for spec in program.graph_signature.input_specs
                 if spec.kind == InputKind.BUFFER)
  assert all(name.endswith(('.k_cache', '.v_cache')) for name in names), names
  return names


def write_device_export(directory, out, *, cache_len, batch=1, formats=FORMATS, qlinear=None,
                        group_size=32, qembedding=None, logits='last', overwrite=False,
                        verify_checksums=True):
  """Writes model.pte ('pte' in `formats`), prefill.pt2 and decode.pt2 ('pt2') and device.json
  to `out`, built by device_model.build_device_model with the quantization requested.

  `out` is assembled beside it and swapped into place (files.replacing): an existing `out` is
  replaced only with `overwrite`, only if it is a device export, and never if it is, contains
  or lies inside the memory export `directory`. Returns the device manifest.
  """
  files.require_local(out, 'the device programs are written and run as local files')
  out = files.path(out)
  files.check_output(out, DEVICE_EXPORT, overwrite=overwrite, sources=(directory,))
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown or not formats:
    raise ValueError(f'formats={list(formats)}: choose from {FORMATS}')
  if qlinear and group_size < 1:
    raise ValueError(f'--group_size={group_size}: weights per scale must be at least 1')
  if qlinear and 'pte' in formats and group_size % XNNPACK_GROUP:
    raise ValueError(f'--group_size={group_size}: XNNPACK runs 8da4w only in groups of a '
                     f'multiple of {XNNPACK_GROUP} (--formats=pt2 takes any group size)')
  steps = ['check and load the export', 'quantize' if qlinear or qembedding else 'build',
           'torch.export prefill and decode']
  steps += ['save .pt2'] * ('pt2' in formats) + ['lower to ExecuTorch (XNNPACK)'] * (
      'pte' in formats)
  with tqdm(total=len(steps), desc='export_torch', unit='step') as progress:
    def step(name):
      progress.update(steps.index(name) - progress.n)
      progress.set_postfix_str(name)
    step(steps[0])
    model, memory, _ = load_export(directory, verify_checksums)
    scheme = memory.scheme if memory is not None else None
    step(steps[1])
    model = device_model.build_device_model(
        model, cache_len=cache_len, batch=batch, scheme=scheme, logits=logits, qlinear=qlinear,
        group_size=group_size, qembedding=qembedding)
    step(steps[2])
    programs = export_programs(model, cache_len, batch)
    with files.replacing(out, DEVICE_EXPORT, overwrite=overwrite,
                         sources=(directory,)) as temporary:
      program_files = {}
      if 'pt2' in formats:
        step('save .pt2')
        for name, program in programs.items():
          save_program(program, temporary / f'{name}.pt2')
          program_files[name] = f'{name}.pt2'
      if 'pte' in formats:
        step('lower to ExecuTorch (XNNPACK)')
        (temporary / PTE).write_bytes(lower_to_executorch(programs))
        program_files['executorch'] = PTE
      progress.update(len(steps) - progress.n)
      device = {'format': DEVICE_FORMAT, 'version': DEVICE_VERSION,
                'source': str(files.path(directory)),
                'source_manifest_sha256': memory_store.file_record(
                    files.path(directory) / memory_store.MANIFEST)['sha256'],
                'cache_len': cache_len, 'batch': batch, 'logits': logits,
                'tables': scheme.record() if scheme is not None else None,
                'quantization': {'linear': qlinear,
                                 'group_size': group_size if qlinear else None,
                                 'embedding': qembedding},
                'cache': {'shape': [batch, cache_len, model.config['num_kv_heads'],
                                    model.config['head_dim']], 'dtype': 'float32',
                          'buffers': {name: cache_buffers(program)
                                      for name, program in programs.items()}},
                'files': {name: {'file': file, **memory_store.file_record(temporary / file)}
                          for name, file in program_files.items()},
                'signature': signature(model.config, scheme, batch, cache_len, logits)}
      device['binding_sha256'] = binding_digest(device)
      (temporary / DEVICE_MANIFEST).write_text(json.dumps(device, indent=1) + '\n')
  return device


def binding_digest(device):
  """sha256 over every field of device.json but this digest: the memory manifest's sha256, the
  programs' records, the signature and every setting the runner trusts."""
  bound = {key: value for key, value in device.items() if key != 'binding_sha256'}
  return hashlib.sha256(json.dumps(bound, sort_keys=True).encode()).hexdigest()
