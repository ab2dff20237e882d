"""Test session set-up: 8 virtual CPU devices, created before jax is first imported.

Every sharding test then runs the real partitioned program on a (data, fsdp, tensor) mesh.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()

import pytest  # noqa: E402  (after the environment is set)


@pytest.fixture
def tiny_model_config():
  """A factory of small `config.model`s (vocab 97, 2 layers, d_model 32, fp32) for model tests.

  Keyword arguments override model fields; `meki=dict(...)` overrides MeKi fields.
  """
  from configs import base

  def make(meki=None, **overrides):
    config = base.model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, d_ff=64,
                               d_mem=8)
    config.vocab_size = 97
    config.head_dim = 8
    config.dtype = 'float32'
    config.remat_policy = 'none'
    config.update(overrides)
    config.meki.update(meki or {})
    return config

  return make
