"""Where the training state lives: parameters and Adam moments in host memory train exactly as
in HBM, and stay in host memory."""

import functools

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from configs import base
from meki_jax import sharding
from meki_jax.model.transformer import build_model
from meki_jax.train import optim, state as state_lib, step as step_lib
from tests.train.test_step import _batch


def _memory_kinds(tree):
  return {leaf.sharding.memory_kind for leaf in jax.tree_util.tree_leaves(tree)}


@pytest.mark.slow  # two 8-device step compiles: 45 s on 2 shared cores
def test_a_state_in_host_memory_trains_like_one_in_hbm(tiny_model_config):
  """A step on 8 devices (fsdp 4 x tensor 2) from and to host memory: the same metrics and new
  state as in HBM, bit for bit."""
  config = base.get_config()
  config.model = tiny_model_config(vocab_size=128)
  config.mesh.shape = ml_collections.ConfigDict(dict(data=1, fsdp=4, tensor=2))
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, num_steps=100)
  train_step = functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                 schedule=optim.learning_rate_schedule(config.optim, 100),
                                 grad_accum_steps=1)
  batch = _batch(config.model.vocab_size)

  def one_step(host_memory):
    _, shardings = state_lib.state_shardings(model, optimizer, mesh, rules, host_memory)
    step = jax.jit(train_step, in_shardings=(shardings, None),
                   out_shardings=(shardings, None), donate_argnums=0)
    state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0),
                                   host_memory)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      return step(state, batch)

  in_hbm, hbm_metrics = one_step(())
  on_host, host_metrics = one_step(state_lib.HOST_MEMORY_PARTS)
  assert _memory_kinds(on_host.params) == _memory_kinds(on_host.opt_state) == {'pinned_host'}
  for a, b in zip(jax.tree_util.tree_leaves(jax.device_get((on_host, host_metrics))),
                  jax.tree_util.tree_leaves(jax.device_get((in_hbm, hbm_metrics)))):
    np.testing.assert_array_equal(a, b)
