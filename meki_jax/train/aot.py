"""Ahead-of-time compilation of the real train step for a TPU topology, from a CPU host.

`libtpu` (pip install -e ".[tpu]") compiles for devices that are not attached: the
topology's devices come from `jax.experimental.topologies`, the state and batch are abstract
(`jax.ShapeDtypeStruct` with shardings), so nothing is allocated. Do not initialise
jax.distributed first; run with JAX_PLATFORMS=cpu so jax does not look for a local TPU.
"""

import dataclasses
import functools
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec

from meki_jax import sharding
from meki_jax.config import validate
from meki_jax.model.attention import resolve_attention
from meki_jax.model.meki import resolve_memory_mix
from meki_jax.model.transformer import build_model, meki_enabled
from meki_jax.train import flops, optim, state as state_lib, step as step_lib
from meki_jax.train.program_flops import program_flops

GIB = 2**30
# generation -> (jax topology prefix, HBM GiB per chip, TensorCores per chip counted in the
# accelerator-type name, dimensions of the chip grid)
GENERATIONS = {'v4': ('v4', 32, 2, 3), 'v5p': ('v5', 95, 2, 3), 'v5e': ('v5e', 16, 1, 2),
               'v6e': ('v6e', 32, 1, 2)}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str  # accelerator type, e.g. 'v5p-64'
  jax_name: str  # e.g. 'v5:2x4x4'
  chips: int
  hbm_gib: float
  chip_config: str
  host_bounds: tuple


def parse_topology(name):
  """'v5p-64' (TensorCores for v4/v5p, chips for v5e/v6e) -> Topology; powers of two only."""
  generation, _, size = name.partition('-')
  if generation not in GENERATIONS or not size.isdigit():
    raise ValueError(f'--topology={name!r}: expected <generation>-<size> with generation in '
                     f'{sorted(GENERATIONS)}, e.g. v5p-64, v5e-16, v4-32')
  prefix, hbm, cores_per_chip, dims = GENERATIONS[generation]
  chips = int(size) // cores_per_chip
  if chips < 1 or chips & (chips - 1) or int(size) % cores_per_chip:
    raise ValueError(f'--topology={name!r}: the chip count {int(size) / cores_per_chip:g} is '
                     'not a power of two')
  if dims == 3:  # v4/v5p grids grow 2x2x1 -> 2x2x2 -> 2x2x4 -> 2x4x4 -> 4x4x4 -> 4x4x8 ...
    shape, order = [2, 2, 1], [2] + [2, 1, 0] * 8
    host = (2, 2, 1)
  else:  # v5e/v6e grids grow 1x1 -> 1x2 -> 2x2 -> 2x4 -> 4x4 -> 4x8 ...
    shape, order = [1, 1], [1, 0] * 8
    host = (2, 4, 1) if chips == 8 else (min(2, chips), min(2, max(chips // 2, 1)), 1)
  for axis in order:
    if math.prod(shape) >= chips:
      break
    shape[axis] *= 2
  if math.prod(shape) != chips:
    raise ValueError(f'--topology={name!r}: {chips} chips is smaller than the smallest slice')
  grid = 'x'.join(str(d) for d in shape)
  chip_config = 'megacore' if cores_per_chip == 2 else 'default'
  return Topology(name, f'{prefix}:{grid}', chips, hbm, chip_config, host)


def topology_devices(topology):
  """The (unattached) devices of `topology`, from libtpu."""
  from jax.experimental import topologies
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')  # not on a TPU VM: no metadata server
  # An AOT compile opens no chip: another process holding libtpu (a test run, a second
  # compile) must not make libtpu's multi-process lockfile abort this one.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  return topologies.get_topology_desc(
      platform='tpu', topology_name=topology.jax_name, chip_config_name=topology.chip_config,
      chips_per_host_bounds=topology.host_bounds, num_slices=1).devices


def compile_train_step(config, topology):
  """Compiles the train step for `topology`; returns a dict of memory and FLOPs figures.

  Memory per device from the compiled program: HBM (argument, temporary, total GiB) and host
  memory (host_* GiB: a state or activations kept there). FLOPs per step: the model's
  (`model_tflops_per_step`, train/flops.py) and the program's matmuls with recomputation and
  every loop multiplied out (`program_tflops_per_step`, train/program_flops.py).

  When the compiler finds the step cannot fit the chip's HBM it refuses to compile; the result
  then has fits=False and the compiler's message under 'error' instead of the memory figures.
  """
  config = validate(config)
  devices = topology_devices(topology)
  mesh = sharding.make_mesh(config.mesh, devices)
  rules = sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps,
                                   config.model.get('flavor', 'paper'))
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  host_memory = state_lib.host_memory_parts(config.optim)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, rules, host_memory)
  abstract_state = jax.tree_util.tree_map(
      lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s), abstract,
      shardings)
  batch_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length'), rules))
  shape = (config.train.global_batch_size, config.data.seq_len)
  batch = {key: jax.ShapeDtypeStruct(shape, jnp.float32 if key == 'loss_mask' else jnp.int32,
                                     sharding=batch_sharding) for key in step_lib.BATCH_KEYS}
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                        schedule=schedule, grad_accum_steps=config.train.grad_accum_steps),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
  tokens = shape[0] * shape[1]
  attention = resolve_attention(config.model.attention, config.data.seq_len,
                                config.model.head_dim, config.model.attention_block, 'tpu')
  micro_batch_tokens = tokens // config.train.grad_accum_steps
  result = {
      'topology': topology.name, 'chips': topology.chips, 'hbm_gib': topology.hbm_gib,
      'attention': attention, 'remat_policy': config.model.remat_policy,
      'remat_offload': tuple(config.model.remat_offload), 'state_on_host': host_memory,
      'memory_mix': (resolve_memory_mix(config.model.memory_mix, micro_batch_tokens,
                                        config.model.vocab_size)
                     if meki_enabled(config.model) else None),
      'grad_accum_steps': config.train.grad_accum_steps,
      'model_tflops_per_step': flops.train_flops_per_token(config.model, config.data.seq_len)
                               * tokens / 1e12,
  }
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    result['program_tflops_per_step'] = program_flops(step_fn, abstract_state, batch) / 1e12
    lowered = step_fn.lower(abstract_state, batch)
    try:
      compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as error:  # the TPU compiler refuses what cannot fit
      if 'RESOURCE_EXHAUSTED' not in str(error):
        raise
      return {**result, 'fits': False, 'error': str(error).split('\n')[0]}
  memory = compiled.memory_analysis()
  arguments = memory.argument_size_in_bytes
  temporaries = memory.temp_size_in_bytes
  outputs_not_aliased = memory.output_size_in_bytes - memory.alias_size_in_bytes
  total = arguments + temporaries + outputs_not_aliased + memory.generated_code_size_in_bytes
  host_outputs = memory.host_output_size_in_bytes - memory.host_alias_size_in_bytes
  host_total = memory.host_argument_size_in_bytes + memory.host_temp_size_in_bytes + host_outputs
  return {**result, 'argument_gib': arguments / GIB, 'temporary_gib': temporaries / GIB,
          'total_gib': total / GIB, 'fits': total / GIB <= topology.hbm_gib,
          'host_argument_gib': memory.host_argument_size_in_bytes / GIB,
          'host_temporary_gib': memory.host_temp_size_in_bytes / GIB,
          'host_total_gib': host_total / GIB}
