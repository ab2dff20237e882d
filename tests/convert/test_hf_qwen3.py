"""Hugging Face Qwen3 -> meki-jax: logits parity with transformers, MeKi start, clear errors."""

import json

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

from configs import base
from meki_jax.convert.hf_qwen3 import load_hf_qwen3, merge_backbone
from meki_jax.model.transformer import build_model


def _tiny_qwen3(path, vocab_size=512, **overrides):
  config = transformers.Qwen3Config(**{**dict(
      vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      num_key_value_heads=2, head_dim=16, intermediate_size=128, rms_norm_eps=1e-6,
      rope_theta=500_000.0, tie_word_embeddings=True, max_position_embeddings=128,
      attn_implementation='eager'), **overrides})
  torch.manual_seed(0)
  model = transformers.Qwen3ForCausalLM(config).eval()
  with torch.no_grad():  # move the norms off 1.0 so a mis-mapped norm is visible
    for name, parameter in model.named_parameters():
      if 'norm' in name:
        parameter.mul_(torch.rand_like(parameter) + 0.5)
  model.save_pretrained(path, safe_serialization=True)
  return model


def _our_config(d_mem=0, vocab_size=512):
  config = base.model_config(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, d_ff=128,
                             d_mem=d_mem)
  config.update(vocab_size=vocab_size, head_dim=16, dtype='float32', remat_policy='none')
  return config


def test_converted_dense_model_matches_transformers_logits(tmp_path):
  hf_model = _tiny_qwen3(tmp_path)
  config = _our_config()
  params = load_hf_qwen3(tmp_path, config)
  token_ids = np.random.default_rng(0).integers(0, 512, size=(2, 24))
  with torch.no_grad():
    expected = hf_model(torch.tensor(token_ids)).logits.numpy()
  logits = build_model(config).apply({'params': params}, token_ids)
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_hugging_face_vocabulary_padding_is_truncated_to_ours(tmp_path):
  """A checkpoint padded to 520 rows loads into our 512-row vocabulary; real ids agree."""
  hf_model = _tiny_qwen3(tmp_path, vocab_size=520)
  config = _our_config(vocab_size=512)
  params = load_hf_qwen3(tmp_path, config)
  assert params['embed']['embedding'].shape == (512, 64)
  token_ids = np.random.default_rng(1).integers(0, 512, size=(1, 16))
  with torch.no_grad():
    expected = hf_model(torch.tensor(token_ids)).logits.numpy()[..., :512]
  logits = build_model(config).apply({'params': params}, token_ids)
  assert np.abs(np.asarray(logits) - expected).max() <= 1e-4


def test_a_meki_model_starts_from_the_qwen3_backbone(tmp_path):
  _tiny_qwen3(tmp_path)
  config = _our_config(d_mem=8)
  backbone = load_hf_qwen3(tmp_path, config)
  fresh = nn.meta.unbox(build_model(config).init(jax.random.PRNGKey(0),
                                                 np.zeros((1, 4), np.int32))['params'])
  merged = merge_backbone(fresh, backbone)
  np.testing.assert_array_equal(merged['layers']['mlp']['up']['kernel'],
                                backbone['layers']['mlp']['up']['kernel'])
  np.testing.assert_array_equal(merged['layers']['meki']['memory']['memory_table'],
                                fresh['layers']['meki']['memory']['memory_table'])


@pytest.mark.parametrize('field, value, message', [
    ('attention_bias', True, 'attention_bias=True is not supported'),
    ('num_key_value_heads', 4, 'num_key_value_heads=4 does not match'),
])
def test_unsupported_or_mismatched_checkpoints_fail_naming_the_field(tmp_path, field, value,
                                                                     message):
  _tiny_qwen3(tmp_path)
  config_path = tmp_path / 'config.json'
  hf_config = json.loads(config_path.read_text())
  hf_config[field] = value
  config_path.write_text(json.dumps(hf_config))
  with pytest.raises(ValueError, match=message):
    load_hf_qwen3(tmp_path, _our_config())


def test_untied_head_and_missing_files_are_refused(tmp_path):
  _tiny_qwen3(tmp_path, tie_word_embeddings=False)
  with pytest.raises(ValueError, match='lm_head.weight differs'):
    load_hf_qwen3(tmp_path, _our_config())
  with pytest.raises(FileNotFoundError, match='config.json does not exist'):
    load_hf_qwen3(tmp_path / 'nowhere', _our_config())
