"""The default logical axis rules shard every large parameter over the fsdp mesh axis."""

import importlib

import jax
import numpy as np
import pytest

from meki_jax import sharding
from meki_jax.model.transformer import build_model
from meki_jax.train import optim, state as state_lib


@pytest.mark.parametrize('name', ['meki_0p6b', 'meki_1p7b', 'meki_4b'])
def test_every_parameter_over_a_million_values_is_sharded_over_fsdp(name):
  """A replicated kernel costs its fp32 value and both Adam moments on every chip: G's down
  projection [28, 1024, 256] was 84 MiB per device at 1.7B before its 'mlp' axis got 'fsdp'."""
  config = importlib.import_module(f'configs.{name}').get_config()
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:8])
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(
      build_model(config.model), optimizer, mesh, sharding.axis_rules(config.mesh))
  sharding.check_divisible(abstract.params, shardings.params)
  replicated = []
  for (path, leaf), leaf_sharding in zip(
      jax.tree_util.tree_leaves_with_path(abstract.params),
      jax.tree_util.tree_leaves(shardings.params)):
    axes = {axis for entry in leaf_sharding.spec if entry
            for axis in ((entry,) if isinstance(entry, str) else entry)}
    if np.prod(leaf.shape) > 2**20 and 'fsdp' not in axes:
      replicated.append((jax.tree_util.keystr(path), leaf.shape, leaf_sharding.spec))
  assert not replicated, replicated
