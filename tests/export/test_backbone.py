"""The backbone safetensors: Hugging Face Qwen3 names and layouts, config metadata, and a file
that does not fit its config is rejected."""

import json

import numpy as np
import pytest
from safetensors.numpy import load_file

from meki_jax.export import backbone
from meki_jax.export.exporter import ram_params
from meki_jax.export.memory_store import ExportError
from tests.export.conftest import moved_params


@pytest.fixture
def tensors(tiny_model_config):
  config = tiny_model_config(meki=dict(position='after_ffn'))
  params = moved_params(config)
  config_dict = json.loads(json.dumps(config.to_dict()))  # as manifest.json holds it
  return config_dict, params, backbone.backbone_tensors(ram_params(params), config_dict)


def test_names_and_layouts_are_pytorch_linear_weights(tensors):
  config, params, named = tensors
  assert {name: value.shape for name, value in named.items()} == backbone.tensor_shapes(config)
  layers = params['layers']
  q = layers['attn']['q']['kernel'][1]  # [d_model, heads, head_dim]
  np.testing.assert_array_equal(named['model.layers.1.self_attn.q_proj.weight'],
                                q.reshape(32, -1).T)  # [heads * head_dim, d_model]
  o = layers['attn']['o']['kernel'][0]  # [heads, head_dim, d_model]
  np.testing.assert_array_equal(named['model.layers.0.self_attn.o_proj.weight'],
                                o.reshape(-1, 32).T)
  np.testing.assert_array_equal(named['model.layers.0.meki.out_proj.weight'],
                                layers['meki']['out']['kernel'][0].T)  # [d_model, d_mem]
  np.testing.assert_array_equal(named['model.layers.1.meki.pre_norm.weight'],
                                layers['pre_meki_norm']['scale'][1])
  assert not any('memory' in name for name in named)  # the tables and G are not RAM


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16'])
def test_written_file_round_trips_with_its_config(tensors, tmp_path, dtype):
  config, _, named = tensors
  path = tmp_path / 'backbone.safetensors'
  backbone.write_backbone(path, named, config, dtype)
  backbone.check_backbone(path, config, dtype)
  loaded = load_file(str(path))
  name = 'model.layers.0.mlp.down_proj.weight'
  expected = np.ascontiguousarray(named[name], loaded[name].dtype)
  np.testing.assert_array_equal(loaded[name].view(np.uint8), expected.view(np.uint8))
  assert [p.name for p in tmp_path.iterdir()] == ['backbone.safetensors']


def test_a_file_that_does_not_fit_its_config_is_rejected(tensors, tmp_path):
  config, _, named = tensors
  path = tmp_path / 'backbone.safetensors'
  backbone.write_backbone(path, named, config, 'float32')
  with pytest.raises(ExportError, match=r'embed_tokens.weight is F32 \[97, 32\], expected F16'):
    backbone.check_backbone(path, config, 'float16')
  with pytest.raises(ExportError, match='config in its metadata differs'):
    backbone.check_backbone(path, {**config, 'd_ff': 128}, 'float32')
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(ExportError, match='not a readable safetensors file'):
    backbone.check_backbone(path, config, 'float32')
  with pytest.raises(ValueError, match=r"missing \['model.norm.weight'\]"):
    backbone.write_backbone(path, {k: v for k, v in named.items() if k != 'model.norm.weight'},
                            config, 'float32')
  assert json.loads(json.dumps(config)) == config  # the metadata form of the config is exact
