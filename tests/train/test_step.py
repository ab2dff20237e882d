"""The train step: masked loss, exact gradient accumulation, and the same step on 1 vs 8 devices."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from configs import base
from meki_jax import sharding
from meki_jax.model.transformer import build_model
from meki_jax.train import optim, state as state_lib, step as step_lib


def _setup(tiny_model_config, mesh_shape, num_devices):
  config = base.get_config()
  config.model = tiny_model_config()
  config.mesh.shape = ml_collections.ConfigDict(mesh_shape)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:num_devices])
  rules = sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, num_steps=100)
  schedule = optim.learning_rate_schedule(config.optim, 100)
  state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0))
  return config, mesh, rules, model, optimizer, schedule, state


def _batch(vocab_size, batch=8, seq=16, seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, vocab_size, size=(batch, seq + 1)).astype(np.int32)
  segment_ids = np.repeat(np.array([[1] * 10 + [2] * 6]), batch, axis=0).astype(np.int32)
  positions = np.concatenate([np.arange(10), np.arange(6)])[None].repeat(batch, 0)
  loss_mask = (rng.random((batch, seq)) > 0.2).astype(np.float32)
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': segment_ids,
          'positions': positions.astype(np.int32), 'loss_mask': loss_mask}


def _step(model, optimizer, schedule, accum):
  return jax.jit(functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                   schedule=schedule, grad_accum_steps=accum))


def test_masked_targets_do_not_change_the_loss(tiny_model_config):
  config, _, _, model, _, _, state = _setup(tiny_model_config, dict(data=1, fsdp=1, tensor=1), 1)
  batch = _batch(config.model.vocab_size)
  masked = np.argwhere(batch['loss_mask'] == 0)[0]
  changed = dict(batch, targets=batch['targets'].copy())
  changed['targets'][tuple(masked)] = (changed['targets'][tuple(masked)] + 1) % 97
  loss = lambda b: step_lib.loss_sums(state.params, model, b)
  np.testing.assert_array_equal(loss(batch), loss(changed))
  assert float(loss(batch)[1]) == batch['loss_mask'].sum()


def test_accumulating_micro_batches_equals_one_big_batch(tiny_model_config):
  """4 micro-batches of 2 rows == 1 batch of 8 rows: same loss and same updated parameters."""
  config, _, _, model, optimizer, schedule, state = _setup(
      tiny_model_config, dict(data=1, fsdp=1, tensor=1), 1)
  batch = _batch(config.model.vocab_size)
  whole, whole_metrics = _step(model, optimizer, schedule, 1)(state, batch)
  accumulated, accum_metrics = _step(model, optimizer, schedule, 4)(state, batch)
  np.testing.assert_allclose(accum_metrics['loss'], whole_metrics['loss'], rtol=1e-6)
  np.testing.assert_allclose(accum_metrics['grad_norm'], whole_metrics['grad_norm'], rtol=1e-5)
  for a, b in zip(jax.tree_util.tree_leaves(accumulated.params),
                  jax.tree_util.tree_leaves(whole.params)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
  assert int(accumulated.step) == int(whole.step) == 1  # a global step, not 4 micro-steps


def test_sharded_step_matches_the_single_device_step(tiny_model_config):
  """fsdp=4 x tensor=2 over 8 devices gives the 1-device loss (fp32, 1e-5)."""
  tiny = lambda **kw: tiny_model_config(vocab_size=128, **kw)  # 128 rows split over 8 devices
  config, _, _, model, optimizer, schedule, single = _setup(tiny, dict(data=1, fsdp=1, tensor=1), 1)
  batch = _batch(config.model.vocab_size)
  _, single_metrics = _step(model, optimizer, schedule, 1)(single, batch)

  _, mesh, rules, _, _, _, sharded = _setup(tiny, dict(data=1, fsdp=4, tensor=2), 8)
  _, shardings = state_lib.state_shardings(model, optimizer, mesh, rules)
  sharded = jax.device_put(jax.device_get(single), shardings)  # the same values, sharded
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    _, sharded_metrics = _step(model, optimizer, schedule, 1)(sharded, batch)
  np.testing.assert_allclose(sharded_metrics['loss'], single_metrics['loss'], rtol=1e-5)
  np.testing.assert_allclose(sharded_metrics['grad_norm'], single_metrics['grad_norm'], rtol=1e-5)


def test_memory_tables_and_their_moments_are_vocab_sharded_without_gathers(tiny_model_config):
  """Each of 8 devices holds ceil(V/8) rows of every table and Adam moment; the compiled step
  contains no all-gather whose result is a whole table."""
  config, mesh, rules, model, optimizer, schedule, state = _setup(
      lambda **kw: tiny_model_config(vocab_size=128, **kw), dict(data=1, fsdp=8, tensor=1), 8)
  table = state.params['layers']['meki']['memory']['memory_table']  # [L, V, m]
  shapes = {shard.data.shape for shard in table.addressable_shards}
  assert shapes == {(2, 128 // 8, 8)}
  adam = state.opt_state[1][0]  # chain(clip, adamw): adamw's ScaleByAdamState
  for moment in (adam.mu, adam.nu):
    shapes = {s.data.shape for s in moment['layers']['meki']['memory']['memory_table']
              .addressable_shards}
    assert shapes == {(2, 128 // 8, 8)}

  batch = _batch(128)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    hlo = _step(model, optimizer, schedule, 1).lower(state, batch).compile().as_text()
  gathers = [line for line in hlo.splitlines() if 'all-gather(' in line or 'all-gather-start(' in line]
  whole_table = [line for line in gathers if '[2,128,8]' in line or '[128,8]' in line]
  assert not whole_table, whole_table
