"""Ahead-of-time compilation for TPU topologies (libtpu, no TPU attached)."""

import importlib.util

import pytest

from meki_jax.train.aot import compile_train_step, parse_topology
from tests.train.test_loop import small_config


@pytest.mark.parametrize('name, jax_name, chips', [
    ('v5p-8', 'v5:2x2x1', 4), ('v5p-16', 'v5:2x2x2', 8), ('v5p-64', 'v5:2x4x4', 32),
    ('v5p-128', 'v5:4x4x4', 64), ('v4-32', 'v4:2x2x4', 16), ('v5e-16', 'v5e:4x4', 16),
    ('v6e-8', 'v6e:2x4', 8), ('v6e-256', 'v6e:16x16', 256)])
def test_accelerator_types_map_to_chip_grids(name, jax_name, chips):
  topology = parse_topology(name)
  assert (topology.jax_name, topology.chips) == (jax_name, chips)


@pytest.mark.parametrize('name', ['v5p', 'v5p-x', 'v3-8', 'v5p-24', 'v5p-2'])
def test_unknown_topologies_are_rejected(name):
  with pytest.raises(ValueError, match='--topology'):
    parse_topology(name)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (.[tpu])')
def test_train_step_compiles_for_a_v5p_slice():
  config = small_config(num_steps=10, grad_accum_steps=2)
  result = compile_train_step(config, parse_topology('v5p-8'))
  assert result['chips'] == 4 and result['fits']
  assert 0 < result['argument_gib'] <= result['total_gib'] < 1
  assert result['model_tflops_per_step'] > 0
