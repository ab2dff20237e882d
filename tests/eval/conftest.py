"""A small MeKi checkpoint with the real Qwen3 vocabulary, shared by the eval tests."""

import jax
import numpy as np
import pytest

from meki_jax import run_config, sharding
from meki_jax.model.transformer import build_model
from meki_jax.train import checkpoint, optim, state as state_lib

CONFIG_FILE = '''
from configs import base

def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(num_layers=3, d_model=32, num_heads=4, num_kv_heads=2,
                                   d_ff=64, d_mem=8)
  config.model.head_dim = 8
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  config.data.seq_len = 64
  config.train.num_steps = 10
  config.train.global_batch_size = 8
  return config
'''


def moved_off_init(params, seed=1):
  """Parameters moved off their initial values (alpha, beta, norm scales != 1; matrices noisier),
  so every layer changes the prediction and the MeKi branch is not a no-op."""
  leaves, treedef = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  moved = [leaf + 2.0 * leaf.std() * jax.random.normal(key, leaf.shape) if leaf.ndim > 1
           else leaf * jax.random.uniform(key, leaf.shape, minval=0.5, maxval=2.0)
           for leaf, key in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(treedef, moved)


@pytest.fixture(scope='session')
def eval_run(tmp_path_factory):
  """(config, config file path, workdir, training params): a step-5 checkpoint written on the
  8-device mesh, and the config.json the trainer writes beside it."""
  workdir = tmp_path_factory.mktemp('eval_run')
  config_path = workdir / 'config.py'
  config_path.write_text(CONFIG_FILE)
  namespace = {}
  exec(CONFIG_FILE, namespace)  # noqa: S102  (the same config the adapter loads from the file)
  config = namespace['get_config']()
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh)
  state = state_lib.create_state(model, optimizer, mesh, sharding.axis_rules(config.mesh),
                                 jax.random.PRNGKey(0))
  params = jax.tree_util.tree_map(lambda new, old: jax.device_put(new, old.sharding),
                                  moved_off_init(state.params), state.params)
  manager = checkpoint.checkpoint_manager(workdir, config.train, run_config.record(config))
  checkpoint.save(manager, 5, state.replace(params=params), None, force=True)
  checkpoint.finish(manager)  # committed: the record is copied to <workdir>/config.json
  manager.close()
  return config, str(config_path), str(workdir), jax.tree_util.tree_map(np.asarray, params)
