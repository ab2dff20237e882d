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
from safetensors.numpy import save_file

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


def backbone_tensors(params, config):
  """Folded (or training) params, unboxed numpy in the scanned layout -> {name: array}.

  params['layers'] leaves carry a leading [num_layers] axis; the fold's tables and training-only
  memory parameters are not part of the backbone and are ignored.
  """
  d = config['d_model']
  layers = params['layers']
  tensors = {'model.embed_tokens.weight': params['embed']['embedding'],
             'model.norm.weight': params['final_norm']['scale']}
  for layer in range(config['num_layers']):
    prefix = f'model.layers.{layer}.'
    take = lambda *path: np.asarray(_get(layers, path))[layer]
    attn = lambda name: take('attn', name, 'kernel')
    tensors.update({
        prefix + 'input_layernorm.weight': take('pre_attn_norm', 'scale'),
        prefix + 'post_attention_layernorm.weight': take('pre_ffn_norm', 'scale'),
        prefix + 'self_attn.q_proj.weight': attn('q').reshape(d, -1).T,  # [d, h, hd] -> [h*hd, d]
        prefix + 'self_attn.k_proj.weight': attn('k').reshape(d, -1).T,
        prefix + 'self_attn.v_proj.weight': attn('v').reshape(d, -1).T,
        prefix + 'self_attn.o_proj.weight': attn('o').reshape(-1, d).T,  # [h, hd, d] -> [d, h*hd]
        prefix + 'mlp.gate_proj.weight': take('mlp', 'gate', 'kernel').T,
        prefix + 'mlp.up_proj.weight': take('mlp', 'up', 'kernel').T,
        prefix + 'mlp.down_proj.weight': take('mlp', 'down', 'kernel').T})
    if config['qk_norm']:
      tensors[prefix + 'self_attn.q_norm.weight'] = take('attn', 'q_norm', 'scale')
      tensors[prefix + 'self_attn.k_norm.weight'] = take('attn', 'k_norm', 'scale')
    if _meki_enabled(config):
      tensors[prefix + 'meki.gate_proj.weight'] = take('meki', 'gate', 'kernel').T
      tensors[prefix + 'meki.out_proj.weight'] = take('meki', 'out', 'kernel').T
      tensors[prefix + 'meki.post_norm.weight'] = take('meki', 'post_norm', 'scale')
      if config['meki']['position'] in ('after_attention', 'after_ffn'):
        tensors[prefix + 'meki.pre_norm.weight'] = take('pre_meki_norm', 'scale')
  return tensors


def _get(tree, path):
  for key in path:
    if key not in tree:
      raise KeyError(f"params['layers']: no {'/'.join(path)} (at {key!r})")
    tree = tree[key]
  return tree


def write_backbone(path, tensors, config, dtype):
  """Writes `tensors` cast to `dtype` (float32 | float16 | bfloat16) atomically to `path`."""
  if dtype not in DTYPES:
    raise ValueError(f'backbone dtype={dtype!r} is not one of {tuple(DTYPES)}')
  expected = tensor_shapes(config)
  if set(tensors) != set(expected):
    raise ValueError(f'backbone tensors differ from the config\'s: missing '
                     f'{sorted(set(expected) - set(tensors))}, extra '
                     f'{sorted(set(tensors) - set(expected))}')
  arrays = {name: np.ascontiguousarray(np.asarray(tensors[name], np.float32), DTYPES[dtype])
            for name in sorted(expected)}
  path = pathlib.Path(path)
  temporary = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  save_file(arrays, str(temporary),
            metadata={'format': FORMAT, 'config': json.dumps(config, sort_keys=True)})
  os.replace(temporary, path)


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
