"""Hugging Face Qwen3 checkpoints (config.json + safetensors) -> meki-jax backbone parameters.

A MeKi model can start from a pretrained Qwen3: `load_hf_qwen3` reads the dense backbone into
our scanned layout, and `merge_backbone` puts it into freshly initialised MeKi parameters (the
memory branch keeps its initial values). Tensors are read with safetensors' numpy loader:
nothing is unpickled and torch is not needed.

Vocabulary: Hugging Face's Qwen3 configs pad the embedding to 151,936 rows, ours to 151,680
(spec section 1); both hold the 151,669 real tokens first. Rows up to our vocab_size are copied,
rows beyond it are dropped, and rows we have but the checkpoint lacks are zero.
The output projection must be tied to the embedding (Qwen3-0.6B/1.7B/4B are); an untied
lm_head is accepted only if it equals the embedding.
"""

import json
import pathlib

import jax
import numpy as np
from safetensors.numpy import load_file

UNSUPPORTED = {  # config.json field -> value that we can convert
    'attention_bias': False,
    'use_sliding_window': False,
    'rope_scaling': None,
}


def read_hf_config(hf_dir):
  path = pathlib.Path(hf_dir) / 'config.json'
  if not path.is_file():
    raise FileNotFoundError(f'{path} does not exist: not a Hugging Face checkpoint directory')
  return json.loads(path.read_text())


def _rope_theta(hf_config):
  if 'rope_theta' in hf_config:
    return float(hf_config['rope_theta'])
  parameters = hf_config.get('rope_parameters') or {}
  if parameters.get('rope_type', 'default') != 'default':
    raise ValueError(f"config.json rope_parameters.rope_type={parameters['rope_type']!r}: only "
                     "'default' RoPE is supported")
  return float(parameters.get('rope_theta', 10000.0))


def check_hf_config(hf_config, model_config):
  """Fails naming the config.json field that our model (`config.model`) cannot reproduce."""
  if hf_config.get('model_type') not in ('qwen3', None):
    raise ValueError(f"config.json model_type={hf_config.get('model_type')!r} is not 'qwen3'")
  for field, supported in UNSUPPORTED.items():
    value = hf_config.get(field, supported)
    if field == 'rope_scaling' and isinstance(value, dict) and value.get('rope_type') == 'default':
      value = None
    if value != supported:
      raise ValueError(f'config.json {field}={value!r} is not supported (needs {supported!r})')
  expected = {'hidden_size': model_config.d_model,
              'num_hidden_layers': model_config.num_layers,
              'num_attention_heads': model_config.num_heads,
              'num_key_value_heads': model_config.num_kv_heads,
              'head_dim': model_config.head_dim,
              'intermediate_size': model_config.d_ff}
  for field, ours in expected.items():
    if hf_config.get(field) != ours:
      raise ValueError(f'config.json {field}={hf_config.get(field)} does not match our '
                       f'config.model ({ours})')
  if abs(_rope_theta(hf_config) - model_config.rope_theta) > 1e-6 * model_config.rope_theta:
    raise ValueError(f'config.json rope_theta={_rope_theta(hf_config)} does not match '
                     f'config.model.rope_theta={model_config.rope_theta}')
  if abs(hf_config.get('rms_norm_eps', 1e-6) - model_config.norm_eps) > 1e-12:
    raise ValueError(f"config.json rms_norm_eps={hf_config.get('rms_norm_eps')} does not match "
                     f'config.model.norm_eps={model_config.norm_eps}')


def _read_tensors(hf_dir):
  files = sorted(pathlib.Path(hf_dir).glob('*.safetensors'))
  if not files:
    raise FileNotFoundError(f'no *.safetensors files in {hf_dir}')
  tensors = {}
  for file in files:
    tensors.update(load_file(str(file)))
  return tensors


def _resize_vocab(embedding, vocab_size):
  rows = min(vocab_size, embedding.shape[0])
  resized = np.zeros((vocab_size, embedding.shape[1]), np.float32)
  resized[:rows] = embedding[:rows]
  return resized


def load_hf_qwen3(hf_dir, model_config):
  """Reads a Hugging Face Qwen3 checkpoint into our dense backbone tree (float32 numpy).

  Returns {'embed': {'embedding': [V, d]}, 'final_norm': ..., 'layers': {...}} with every layer
  leaf stacked on a leading [num_layers] axis, as nn.scan lays it out.
  """
  hf_config = read_hf_config(hf_dir)
  check_hf_config(hf_config, model_config)
  tensors = _read_tensors(hf_dir)

  def get(name):
    if name not in tensors:
      raise KeyError(f'{hf_dir}: tensor {name!r} is missing from the safetensors files')
    return np.asarray(tensors[name], np.float32)

  embedding = get('model.embed_tokens.weight')  # [V_hf, d]
  if 'lm_head.weight' in tensors and not np.array_equal(get('lm_head.weight'), embedding):
    raise ValueError(f'{hf_dir}: lm_head.weight differs from model.embed_tokens.weight; '
                     'meki-jax ties the output projection to the embedding')
  d, heads, kv_heads, head_dim = (model_config.d_model, model_config.num_heads,
                                  model_config.num_kv_heads, model_config.head_dim)

  def layer(i):
    prefix = f'model.layers.{i}.'
    w = lambda name: get(prefix + name)
    attn = {'q': {'kernel': w('self_attn.q_proj.weight').T.reshape(d, heads, head_dim)},
            'k': {'kernel': w('self_attn.k_proj.weight').T.reshape(d, kv_heads, head_dim)},
            'v': {'kernel': w('self_attn.v_proj.weight').T.reshape(d, kv_heads, head_dim)},
            'o': {'kernel': w('self_attn.o_proj.weight').T.reshape(heads, head_dim, d)}}
    if model_config.qk_norm:
      attn['q_norm'] = {'scale': w('self_attn.q_norm.weight')}
      attn['k_norm'] = {'scale': w('self_attn.k_norm.weight')}
    return {'attn': attn,
            'pre_attn_norm': {'scale': w('input_layernorm.weight')},
            'pre_ffn_norm': {'scale': w('post_attention_layernorm.weight')},
            'mlp': {'gate': {'kernel': w('mlp.gate_proj.weight').T},
                    'up': {'kernel': w('mlp.up_proj.weight').T},
                    'down': {'kernel': w('mlp.down_proj.weight').T}}}

  layers = [layer(i) for i in range(model_config.num_layers)]
  stacked = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *layers)
  return {'embed': {'embedding': _resize_vocab(embedding, model_config.vocab_size)},
          'final_norm': {'scale': get('model.norm.weight')},
          'layers': stacked}


def merge_backbone(params, backbone):
  """Replaces the leaves of `params` (e.g. a fresh MeKi init) that `backbone` provides.

  Every backbone leaf must exist in `params` with the same shape; other leaves (the MeKi
  branch) are kept. Returns a new tree.
  """
  def merge(target, source, path):
    if isinstance(source, dict):
      if not isinstance(target, dict):
        raise ValueError(f'{path}: the backbone has a subtree where params has a leaf')
      missing = set(source) - set(target)
      if missing:
        raise ValueError(f'{path or "params"}: backbone entries {sorted(missing)} do not exist '
                         'in the model')
      return {k: merge(target[k], source[k], f'{path}/{k}') if k in source else target[k]
              for k in target}
    if tuple(np.shape(target)) != tuple(np.shape(source)):
      raise ValueError(f'{path}: backbone shape {np.shape(source)} != model shape '
                       f'{np.shape(target)}')
    return np.asarray(source, np.asarray(target).dtype)
  return merge(params, backbone, '')
