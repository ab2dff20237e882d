"""The training state, its creation directly in its sharded layout, and where it lives.

Parameters and optimizer state are initialised inside `jax.jit` with `out_shardings` derived
from the parameters' logical axes, so each device only ever materialises its own shards (a 4B
model never exists whole on a host).

Either part may live in the host's pinned memory instead of HBM (`config.optim.params_on_host`,
`config.optim.opt_state_on_host`): same shards, memory kind 'pinned_host'. A step then streams
it into HBM (`in_device_memory`) and the step's output shardings send it back.
"""

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from meki_jax import sharding


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # optimizer steps taken (= global steps; micro-batches are not counted)
  params: dict
  opt_state: optax.OptState


def _init_fn(model, optimizer):
  def init(rng):
    token_ids = jnp.zeros((1, 1), jnp.int32)  # parameter shapes do not depend on length
    params = model.init(rng, token_ids)['params']  # boxed with logical axes
    unboxed = nn.meta.unbox(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(unboxed))
  return init


HOST_MEMORY_PARTS = ('params', 'opt_state')


def host_memory_parts(optim_config):
  """The parts of the TrainState that `config.optim` keeps in host memory."""
  return tuple(part for part in HOST_MEMORY_PARTS if optim_config[f'{part}_on_host'])


def in_device_memory(tree):
  """The arrays of `tree` in device memory (HBM), inside jit: a state kept in host memory is
  streamed in; arrays already in HBM are left where they are (no copy)."""
  return jax.device_put(tree, jax.memory.Space.Device)


def state_shardings(model, optimizer, mesh, rules, host_memory=()):
  """(abstract unboxed TrainState, its NamedShardings) without allocating anything.

  The optimizer's moments take their parameter's sharding: optax mirrors the parameter tree,
  and each moment leaf is matched to the parameter at the same path. The parts named in
  `host_memory` (of HOST_MEMORY_PARTS) get the memory kind 'pinned_host'.
  """
  abstract = jax.eval_shape(_init_fn(model, optimizer), jax.random.PRNGKey(0))
  param_shardings = sharding.logical_shardings(abstract.params, mesh, rules)
  unboxed_params = nn.meta.unbox(abstract.params)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  opt_shardings = optax.tree_map_params(
      optimizer, lambda _, param_sharding: param_sharding, abstract.opt_state, param_shardings,
      transform_non_params=lambda _: replicated)
  on_host = lambda tree: jax.tree_util.tree_map(
      lambda leaf: leaf.with_memory_kind('pinned_host'), tree)
  if 'params' in host_memory:
    param_shardings = on_host(param_shardings)
  if 'opt_state' in host_memory:
    opt_shardings = on_host(opt_shardings)
  shardings = TrainState(step=replicated, params=param_shardings,
                         opt_state=opt_shardings)
  abstract = TrainState(step=abstract.step, params=unboxed_params, opt_state=abstract.opt_state)
  sharding.check_divisible(abstract.params, shardings.params)
  return abstract, shardings


def create_state(model, optimizer, mesh, rules, rng, host_memory=()):
  """A freshly initialised, sharded TrainState (`host_memory`: see state_shardings)."""
  _, shardings = state_shardings(model, optimizer, mesh, rules, host_memory)
  init = _init_fn(model, optimizer)

  def unboxed_init(rng):
    state = init(rng)
    return state.replace(params=nn.meta.unbox(state.params))

  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return jax.jit(unboxed_init, out_shardings=shardings)(rng)
