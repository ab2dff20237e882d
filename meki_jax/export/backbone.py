"""The RAM part of a folded model (everything but the tables M~) as safetensors.

Names and layouts are Hugging Face Qwen3's, so a PyTorch user reads them as nn.Linear weights
([out_features, in_features]): `model.embed_tokens.weight` [V, d] (also the tied output
projection), `model.layers.N.self_attn.{q,k,v,o}_proj.weight`, `...self_attn.{q,k}_norm.weight`,
`...input_layernorm.weight` (pre-attention), `...post_attention_layernorm.weight` (pre-FFN),
`...mlp.{gate,up,down}_proj.weight`, `model.norm.weight`; the MeKi branch adds
`model.layers.N.meki.{gate_proj,out_proj,post_norm}.weight` and, for positions after attention
or after the FFN, `...meki.pre_norm.weight`. The file's metadata holds the model config.

Pure numpy + safetensors (no jax, no torch): the JAX exporter writes with it, the PyTorch side
checks a file with it before loading it.
"""

import json
import mmap
import os
import pathlib
from typing import Callable, NamedTuple

import numpy as np
from safetensors import safe_open

from meki_jax.export.memory_store import ExportError
from meki_jax.export.table_quant import FLOAT_DTYPES

FORMAT = 'meki-backbone'
SAFETENSORS_DTYPES = {'float32': 'F32', 'float16': 'F16', 'bfloat16': 'BF16'}


def _meki_enabled(config):
  return bool(config['meki']['enabled']) and config['meki']['d_mem'] > 0


def tensor_shapes(config):
  """{name: shape} of every tensor a backbone of this model config (a dict) holds."""
  d, heads, kv_heads, head_dim = (config['d_model'], config['num_heads'], config['num_kv_heads'],
                                  config['head_dim'])
  shapes = {'model.embed_tokens.weight': (config['vocab_size'], d), 'model.norm.weight': (d,)}
  for layer in range(config['num_layers']):
    prefix = f'model.layers.{layer}.'
    layer_shapes = {
        'input_layernorm.weight': (d,), 'post_attention_layernorm.weight': (d,),
        'self_attn.q_proj.weight': (heads * head_dim, d),
        'self_attn.k_proj.weight': (kv_heads * head_dim, d),
        'self_attn.v_proj.weight': (kv_heads * head_dim, d),
        'self_attn.o_proj.weight': (d, heads * head_dim),
        'mlp.gate_proj.weight': (config['d_ff'], d), 'mlp.up_proj.weight': (config['d_ff'], d),
        'mlp.down_proj.weight': (d, config['d_ff'])}
    if config['qk_norm']:
      layer_shapes.update({'self_attn.q_norm.weight': (head_dim,),
                           'self_attn.k_norm.weight': (head_dim,)})
    if _meki_enabled(config):
      d_mem = config['meki']['d_mem']
      layer_shapes.update({'meki.gate_proj.weight': (d_mem, d),
                           'meki.out_proj.weight': (d, d_mem), 'meki.post_norm.weight': (d,)})
      if config['meki']['position'] in ('after_attention', 'after_ffn'):
        layer_shapes['meki.pre_norm.weight'] = (d,)
    shapes.update({prefix + name: shape for name, shape in layer_shapes.items()})
  return shapes


class Transform(NamedTuple):
  """How one layer of a checkpoint leaf, x, becomes a file tensor y: `transform(x)` is y;
  `view(y, x_shape)` is y seen in x's layout, a numpy view of y (no copy), so writing a block
  of x into view(y, x.shape)[block] writes the elements of y it maps to."""
  apply: Callable
  view: Callable

  def __call__(self, x):
    return self.apply(x)


WHOLE = Transform(lambda x: x, lambda y, shape: y)
# y = x.reshape(a, b).T for x of shape `shape`: x is y.T split back into `shape`, still a view.
_TRANSPOSED_VIEW = lambda y, shape: np.reshape(y.T, shape, copy=False)


def tensor_sources(config):
  """[(name, checkpoint path, layer or None, Transform)] of every backbone tensor.

  The tensor is transform(params[path][layer]) (or of params[path] for layer None): a
  [num_layers]-stacked leaf of the scanned layout, indexed, and turned into Hugging Face's
  [out_features, in_features] layout.
  """
  d = config['d_model']
  whole = WHOLE
  transposed = Transform(lambda x: x.T, _TRANSPOSED_VIEW)
  heads_in = Transform(lambda x: x.reshape(d, -1).T, _TRANSPOSED_VIEW)
  heads_out = Transform(lambda x: x.reshape(-1, d).T, _TRANSPOSED_VIEW)
  sources = [('model.embed_tokens.weight', ('embed', 'embedding'), None, whole),
             ('model.norm.weight', ('final_norm', 'scale'), None, whole)]
  per_layer = [
      ('input_layernorm.weight', ('pre_attn_norm', 'scale'), whole),
      ('post_attention_layernorm.weight', ('pre_ffn_norm', 'scale'), whole),
      ('self_attn.q_proj.weight', ('attn', 'q', 'kernel'), heads_in),  # [d, h, hd] -> [h*hd, d]
      ('self_attn.k_proj.weight', ('attn', 'k', 'kernel'), heads_in),
      ('self_attn.v_proj.weight', ('attn', 'v', 'kernel'), heads_in),
      ('self_attn.o_proj.weight', ('attn', 'o', 'kernel'), heads_out),  # [h, hd, d] -> [d, h*hd]
      ('mlp.gate_proj.weight', ('mlp', 'gate', 'kernel'), transposed),
      ('mlp.up_proj.weight', ('mlp', 'up', 'kernel'), transposed),
      ('mlp.down_proj.weight', ('mlp', 'down', 'kernel'), transposed)]
  if config['qk_norm']:
    per_layer += [('self_attn.q_norm.weight', ('attn', 'q_norm', 'scale'), whole),
                  ('self_attn.k_norm.weight', ('attn', 'k_norm', 'scale'), whole)]
  if _meki_enabled(config):
    per_layer += [('meki.gate_proj.weight', ('meki', 'gate', 'kernel'), transposed),
                  ('meki.out_proj.weight', ('meki', 'out', 'kernel'), transposed),
                  ('meki.post_norm.weight', ('meki', 'post_norm', 'scale'), whole)]
    if config['meki']['position'] in ('after_attention', 'after_ffn'):
      per_layer.append(('meki.pre_norm.weight', ('pre_meki_norm', 'scale'), whole))
  for suffix, path, transform in per_layer:
    sources += [(f'model.layers.{layer}.{suffix}', ('layers',) + path, layer, transform)
                for layer in range(config['num_layers'])]
  return sources


def backbone_tensors(params, config):
  """Folded (or training) params, unboxed numpy in the scanned layout -> {name: array}.

  params['layers'] leaves carry a leading [num_layers] axis; the fold's tables and training-only
  memory parameters are not part of the backbone and are ignored.
  """
  tensors = {}
  for name, path, layer, transform in tensor_sources(config):
    leaf = np.asarray(_get(params, path))
    tensors[name] = transform(leaf if layer is None else leaf[layer])
  return tensors


def _get(tree, path):
  for key in path:
    if key not in tree:
      raise KeyError(f"params: no {'/'.join(path)} (at {key!r})")
    tree = tree[key]
  return tree


def write_backbone(path, tensors, config, dtype):
  """Writes `tensors` cast to `dtype` (float32 | float16 | bfloat16) atomically to `path`."""
  expected = tensor_shapes(config)
  if set(tensors) != set(expected):
    raise ValueError(f'backbone tensors differ from the config\'s: missing '
                     f'{sorted(set(expected) - set(tensors))}, extra '
                     f'{sorted(set(tensors) - set(expected))}')
  writer = StreamingWriter(path, config, dtype)
  try:
    for name in sorted(expected):
      writer.put(name, tensors[name])
    writer.finish()
  except BaseException:
    writer.abort()
    raise


class StreamingWriter:
  """Writes a backbone safetensors file tensor by tensor, in any order, never holding it whole.

  The header (names, dtypes, shapes, offsets: safetensors' own order, by name, and its JSON and
  padding) is written first from the config's shapes, then `put(name, array)` casts each tensor
  and writes its bytes at its offset (or `put_block` a block of it, through a memory map of the
  tensor alone, unmapped after the block); the file is byte-identical to `write_backbone`'s.
  `finish()` checks every tensor was written, syncs and renames the file into place.
  """

  def __init__(self, path, config, dtype):
    if dtype not in FLOAT_DTYPES:
      raise ValueError(f'backbone dtype={dtype!r} is not one of {tuple(FLOAT_DTYPES)}')
    self.path = pathlib.Path(path)
    self.dtype = FLOAT_DTYPES[dtype]
    self.shapes = tensor_shapes(config)
    header, offset = {}, 0
    for name in sorted(self.shapes):
      size = int(np.prod(self.shapes[name])) * self.dtype.itemsize
      header[name] = {'dtype': SAFETENSORS_DTYPES[dtype], 'shape': list(self.shapes[name]),
                      'data_offsets': [offset, offset + size]}
      offset += size
    # write_backbone's metadata order is whatever safetensors' hash map gives; here it is sorted.
    metadata = {'config': json.dumps(config, sort_keys=True), 'format': FORMAT}
    text = json.dumps({'__metadata__': metadata, **header}, separators=(',', ':'),
                      ensure_ascii=False).encode()
    text += b' ' * (-(8 + len(text)) % 8)
    self._data_start = 8 + len(text)
    self._offsets = {name: entry['data_offsets'][0] for name, entry in header.items()}
    self._pending = set(self.shapes)
    self._written = {}  # elements written so far per tensor
    self._temporary = self.path.with_name(f'.{self.path.name}.{os.getpid()}.tmp')
    self._file = open(self._temporary, 'w+b')  # readable too: put_block maps it
    self._file.write(len(text).to_bytes(8, 'little') + text)
    self._file.truncate(self._data_start + offset)

  def put(self, name, array, row_start=None):
    """Casts `array` to the file's dtype and writes it as tensor `name`; with `row_start`,
    `array` is rows [row_start, row_start + len(array)) of it (the tensor is complete once every
    row was written, in any order, each once)."""
    shape = tuple(self.shapes.get(name, ()))
    if name not in self._pending:
      raise ValueError(f'{self.path}: tensor {name} is ' +
                       ('written twice' if name in self.shapes else 'not in this config'))
    start = 0 if row_start is None else row_start
    rows = shape[0] if row_start is None else len(array)
    if tuple(np.shape(array)) != (rows,) + shape[1:] or start + rows > shape[0]:
      raise ValueError(f'{self.path}: {name} rows [{start}, {start + rows}) of shape '
                       f'{list(np.shape(array))} do not fit its shape {list(shape)}')
    data = np.ascontiguousarray(np.asarray(array, np.float32), self.dtype).reshape(-1)
    view = memoryview(data.view(np.uint8))
    position = (self._data_start + self._offsets[name] +
                start * int(np.prod(shape[1:])) * self.dtype.itemsize)
    while view.nbytes:  # pwrite may write less than asked (Linux: at most 2 GiB per call)
      written = os.pwrite(self._file.fileno(), view, position)
      view, position = view[written:], position + written
    self._count(name, data.size)

  def put_block(self, name, block, index, view=WHOLE.view, source_shape=None):
    """Casts `block` to the file's dtype and writes it as the elements [index] of tensor `name`
    seen through `view` (a Transform's view) in `source_shape`, the layout `block` comes from
    (default: the tensor's own). The tensor is complete once every element was written, each
    once, in blocks of any shape and order.

    Written through a memory map of the tensor's bytes, unmapped on return: its pages are
    resident only meanwhile (a block of columns of a transposed tensor touches all of them).
    """
    if name not in self._pending:
      raise ValueError(f'{self.path}: tensor {name} is ' +
                       ('written twice' if name in self.shapes else 'not in this config'))
    shape = tuple(self.shapes[name])
    start = self._data_start + self._offsets[name]
    aligned = start - start % mmap.ALLOCATIONGRANULARITY  # mmap's offsets are page-aligned
    size = int(np.prod(shape)) * self.dtype.itemsize
    mapped = mmap.mmap(self._file.fileno(), start - aligned + size, offset=aligned)
    try:
      tensor = np.frombuffer(mapped, self.dtype, int(np.prod(shape)), start - aligned)
      target = view(tensor.reshape(shape), source_shape or shape)[index]
      if target.shape != np.shape(block):
        raise ValueError(f'{self.path}: {name}: a block of shape {list(np.shape(block))} does '
                         f'not fit [{index}] of its source shape {list(source_shape or shape)}')
      target[...] = np.asarray(block, np.float32).astype(self.dtype)
    finally:
      tensor = target = None  # no array left on the map, so it can be unmapped now
      mapped.close()
    self._count(name, np.size(block))

  def _count(self, name, size):
    self._written[name] = self._written.get(name, 0) + size
    if self._written[name] == int(np.prod(self.shapes[name])):
      self._pending.discard(name)

  def finish(self):
    if self._pending:
      raise ValueError(f'{self.path}: tensors {sorted(self._pending)[:5]} were not written')
    self._file.flush()
    os.fsync(self._file.fileno())
    self._file.close()
    os.replace(self._temporary, self.path)

  def abort(self):
    self._file.close()
    self._temporary.unlink(missing_ok=True)


def check_backbone(path, config, dtype):
  """Fails naming the tensor unless `path` holds exactly this config's tensors, shapes, dtype
  and config metadata. Reads the header only."""
  expected = tensor_shapes(config)
  try:
    with safe_open(str(path), framework='np') as f:
      metadata, names = f.metadata() or {}, set(f.keys())
      found = {name: (tuple(f.get_slice(name).get_shape()), f.get_slice(name).get_dtype())
               for name in names & set(expected)}
  except Exception as error:  # safetensors raises its own error types for a damaged header
    raise ExportError(f'{path} is not a readable safetensors file: {error}') from error
  if metadata.get('format') != FORMAT:
    raise ExportError(f'{path}: metadata format={metadata.get("format")!r}, expected {FORMAT!r}')
  if json.loads(metadata.get('config', 'null')) != json.loads(json.dumps(config)):  # tuples
    raise ExportError(f'{path}: the config in its metadata differs from manifest.json\'s')
  if names != set(expected):
    raise ExportError(f'{path}: missing tensors {sorted(set(expected) - names)}, unexpected '
                      f'{sorted(names - set(expected))}')
  for name, shape in expected.items():
    if found[name] != (shape, SAFETENSORS_DTYPES[dtype]):
      raise ExportError(f'{path}: {name} is {found[name][1]} {list(found[name][0])}, expected '
                        f'{SAFETENSORS_DTYPES[dtype]} {list(shape)}')
