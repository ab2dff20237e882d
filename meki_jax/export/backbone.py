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
import os
import pathlib

import numpy as np
from safetensors import safe_open

from meki_jax.export.memory_store import DTYPES, ExportError

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


def tensor_sources(config):
  """[(name, checkpoint path, layer or None, transform)] of every backbone tensor.

  The tensor is transform(params[path][layer]) (or of params[path] for layer None): a
  [num_layers]-stacked leaf of the scanned layout, indexed, and turned into Hugging Face's
  [out_features, in_features] layout.
  """
  d = config['d_model']
  whole = lambda x: x
  transposed = lambda x: x.T
  sources = [('model.embed_tokens.weight', ('embed', 'embedding'), None, whole),
             ('model.norm.weight', ('final_norm', 'scale'), None, whole)]
  per_layer = [
      ('input_layernorm.weight', ('pre_attn_norm', 'scale'), whole),
      ('post_attention_layernorm.weight', ('pre_ffn_norm', 'scale'), whole),
      ('self_attn.q_proj.weight', ('attn', 'q', 'kernel'),
       lambda x: x.reshape(d, -1).T),  # [d, h, hd] -> [h*hd, d]
      ('self_attn.k_proj.weight', ('attn', 'k', 'kernel'), lambda x: x.reshape(d, -1).T),
      ('self_attn.v_proj.weight', ('attn', 'v', 'kernel'), lambda x: x.reshape(d, -1).T),
      ('self_attn.o_proj.weight', ('attn', 'o', 'kernel'),
       lambda x: x.reshape(-1, d).T),  # [h, hd, d] -> [d, h*hd]
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
  and writes its bytes at its offset; the file is byte-identical to `write_backbone`'s.
  `finish()` checks every tensor was written, syncs and renames the file into place.
  """

  def __init__(self, path, config, dtype):
    if dtype not in DTYPES:
      raise ValueError(f'backbone dtype={dtype!r} is not one of {tuple(DTYPES)}')
    self.path = pathlib.Path(path)
    self.dtype = DTYPES[dtype]
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
    self._rows = {}  # rows written so far per tensor
    self._temporary = self.path.with_name(f'.{self.path.name}.{os.getpid()}.tmp')
    self._file = open(self._temporary, 'wb')
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
    self._rows[name] = self._rows.get(name, 0) + rows
    if self._rows[name] == shape[0]:
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
