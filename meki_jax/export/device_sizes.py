"""Bytes a device export needs, by quantization: the program (RAM) and the tables (ROM).

Counted from the shapes of the device graph (export/torch_model.py built on the meta device, so
nothing is allocated) and the storage rules of the schemes:
  program, fp32      every parameter 4 B (the output projection is the embedding, tied)
  program, 8da4w+8w  every linear weight 0.5 B plus a 2-byte scale per `group_size` input values
                     (XNNPACK's int4 weights and bf16 scales), the untied output projection
                     among them; the embedding 1 B per value plus a 4-byte scale per row; norms
                     4 B per gain
  tables             memory_store's zarr3 files: per token L x stored width (table_quant) plus
                     a crc32c (4 B); per shard an index of 16 B per row it can hold and a crc32c
The .pte adds its graph and delegate headers (0.74 MB for Qwen3-0.6B: benchmarks/
device_decode.py prints the real files). Imports torch; not jax.
"""

import torch

from meki_jax.export import memory_store, table_quant
from meki_jax.export.torch_model import MekiForCausalLM

PROGRAMS = ('fp32', '8da4w+8w')


def _parameter_shapes(config):
  """{name: shape} of the device graph's parameters, and the Linear weights' names."""
  with torch.device('meta'):
    model = MekiForCausalLM(config)
  linears = {f'{name}.weight' for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear)}
  return {name: tuple(parameter.shape) for name, parameter in model.named_parameters()}, linears


def program_bytes(config, program='8da4w+8w', group_size=32):
  """Bytes of the weights a program of `config` (a model config dict) holds."""
  if program not in PROGRAMS:
    raise ValueError(f'program={program!r} is not one of {PROGRAMS}')
  shapes, linears = _parameter_shapes(config)
  values = {name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}
  if program == 'fp32':
    return 4 * sum(values.values())
  if group_size < 1:
    raise ValueError(f'group_size={group_size}: weights per scale must be at least 1')
  misfits = sorted(name for name in linears if shapes[name][1] % group_size)
  if misfits:
    raise ValueError(f'group_size={group_size} does not divide the input width of '
                     f'{len(misfits)} linear layers, e.g. {misfits[0]} {list(shapes[misfits[0]])}')
  vocab, d_model = shapes['model.embed_tokens.weight']
  linear_values = sum(values[name] for name in linears) + vocab * d_model  # + output projection
  embedding = vocab * d_model + 4 * vocab
  norms = sum(count for name, count in values.items()
              if name not in linears and name != 'model.embed_tokens.weight')
  return linear_values // 2 + 2 * (linear_values // group_size) + embedding + 4 * norms


def table_bytes(config, scheme, rows_per_shard=8192):
  """Bytes of memory.zarr for a table scheme (table_quant.TableScheme); 0 for a dense model."""
  if not (config['meki']['enabled'] and config['meki']['d_mem'] > 0):
    return 0
  vocab, layers = config['vocab_size'], config['num_layers']
  token = layers * scheme.stored_width(config['meki']['d_mem']) * scheme.storage_dtype.itemsize
  shards = len(memory_store.shard_ranges(vocab, rows_per_shard))
  return vocab * (token + 4) + shards * (16 * rows_per_shard + 4)


def schemes():
  """The table schemes of the size table: fp32, fp16, int8 and int4 in groups of 32."""
  return [table_quant.TableScheme('float32'), table_quant.TableScheme('float16'),
          table_quant.TableScheme('int8'), table_quant.TableScheme('int4', 32)]
