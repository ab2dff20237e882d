"""Test session set-up: 8 virtual CPU devices, created before jax is first imported.

Every sharding test then runs the real partitioned program on a (data, fsdp, tensor) mesh.
"""

import os

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
# gcsfs reads this when imported, which may be before the gcs_emulator fixture starts the server
# (meki_jax.files sets it when STORAGE_EMULATOR_HOST is set at import, as it is for a user)
os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')

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


_EMULATOR_VARIABLES = ('STORAGE_EMULATOR_HOST', 'TENSORSTORE_GCS_HTTP_URL',
                       'GOOGLE_AUTH_TOKEN_FOR_TESTING', 'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT',
                       'CLOUD_STORAGE_EMULATOR_ENDPOINT')


@pytest.fixture(scope='session')
def gcs_emulator(tmp_path_factory):
  """A local Cloud Storage server on 127.0.0.1 for the session (meki_jax.gcs_emulator); every
  client (gcsfs, google-cloud-storage, tensorstore, ArrayRecord's reader, subprocesses) is
  pointed at it."""
  from meki_jax import files
  from meki_jax.gcs_emulator import Emulator
  before = {name: os.environ.get(name) for name in _EMULATOR_VARIABLES}
  emulator = Emulator(log_path=tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log')
  os.environ['STORAGE_EMULATOR_HOST'] = emulator.url
  files._use_emulator()
  try:
    yield emulator
  finally:
    emulator.stop()
    for name, value in before.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@pytest.fixture
def gcs_bucket(gcs_emulator):
  """A new empty bucket on the emulator: 'gs://<name>'."""
  import uuid
  return gcs_emulator.create_bucket(f'test-{uuid.uuid4().hex[:16]}')
