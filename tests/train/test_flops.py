"""The FLOPs formula against the parameters: every kernel is one multiply-add per token."""

import math

import jax
import pytest

from meki_jax.param_count import abstract_params
from meki_jax.train import flops


def _kernel_values(model_config):
  """Values in the kernels of Dense layers, the embedding and tables excluded."""
  params = abstract_params(model_config)
  return sum(math.prod(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(params)
             if path[-1].key == 'kernel')


@pytest.mark.parametrize('variant', [
    {}, dict(meki=dict(memory='static')), dict(meki=dict(memory='dynamic')),
    dict(meki=dict(projection='linear')), dict(meki=dict(position='after_ffn')),
    dict(meki=dict(d_mem=0, enabled=False))])
def test_forward_flops_are_twice_the_kernels_plus_logits_plus_attention(tiny_model_config,
                                                                       variant):
  config = tiny_model_config(**variant)
  seq_len = 64
  attention = config.num_layers * 4 * seq_len * config.num_heads * config.head_dim
  expected = 2 * _kernel_values(config) + 2 * config.d_model * config.vocab_size + attention
  assert flops.forward_flops_per_token(config, seq_len) == expected
  assert flops.train_flops_per_token(config, seq_len) == 3 * expected


def test_ple_and_engram_are_counted(tiny_model_config):
  ple = tiny_model_config(meki=dict(d_mem=0, enabled=False))
  ple.ple.update(enabled=True, d_ple=8)
  assert flops.forward_flops_per_token(ple, 0) == (2 * _kernel_values(ple)
                                                   + 2 * ple.d_model * ple.vocab_size)
  engram = tiny_model_config(meki=dict(d_mem=0, enabled=False))
  engram.engram.update(enabled=True, layers=(0, 1), rows_per_head=512, head_width=4)
  elementwise = len(engram.engram.layers) * (2 + 2 * engram.engram.conv_kernel) * engram.d_model
  assert flops.forward_flops_per_token(engram, 0) == (2 * _kernel_values(engram) + elementwise
                                                      + 2 * engram.d_model * engram.vocab_size)
