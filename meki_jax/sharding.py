"""Logical axis names, logical-to-mesh rules and mesh creation.

Every parameter and the few activations whose layout matters are annotated with names from
`LOGICAL_AXES`; `config.mesh.axis_rules` maps them to mesh axes, so sharding is a config change.
"""

import math

import flax.linen as nn
import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh

# The whole logical vocabulary. Parameters use the first ten ('ple' and 'engram' are the widths
# of the PLE and Engram baselines' tables, whose rows are 'vocab'); activations use batch and
# length.
LOGICAL_AXES = ('vocab', 'embed', 'mlp', 'heads', 'kv_heads', 'head_dim', 'mem', 'ple', 'engram',
                'layers', 'batch', 'length')
MESH_AXES = ('data', 'fsdp', 'tensor')


def axis_rules(mesh_config):
  """`config.mesh.axis_rules` as the tuple-of-pairs flax expects, checked against our names."""
  rules = []
  for entry in mesh_config.axis_rules:
    logical, mesh_axes = entry
    if logical not in LOGICAL_AXES:
      raise ValueError(f'mesh.axis_rules names logical axis {logical!r}; known: {LOGICAL_AXES}')
    names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes or ())
    for name in names:
      if name not in MESH_AXES:
        raise ValueError(f'mesh.axis_rules maps {logical!r} to unknown mesh axis {name!r}; '
                         f'known: {MESH_AXES}')
    rules.append((logical, mesh_axes if mesh_axes is None or isinstance(mesh_axes, str)
                  else tuple(mesh_axes)))
  return tuple(rules)


def mesh_shape(mesh_config, num_devices):
  """Resolves -1 in `config.mesh.shape` to the devices the other axes leave.

  Returns a dict {data, fsdp, tensor} whose product is `num_devices`.
  """
  shape = {axis: int(mesh_config.shape[axis]) for axis in MESH_AXES}
  unknown = [axis for axis, size in shape.items() if size == -1]
  if len(unknown) > 1:
    raise ValueError(f'mesh.shape has -1 for {unknown}; at most one axis may be -1')
  for axis, size in shape.items():
    if size == 0 or size < -1:
      raise ValueError(f'mesh.shape.{axis}={size} must be positive or -1')
  known = math.prod(size for size in shape.values() if size != -1)
  if unknown:
    if num_devices % known:
      raise ValueError(f'mesh.shape {shape}: {num_devices} devices are not divisible by {known}')
    shape[unknown[0]] = num_devices // known
  if math.prod(shape.values()) != num_devices:
    raise ValueError(f'mesh.shape {shape} needs {math.prod(shape.values())} devices, '
                     f'but there are {num_devices}')
  return shape


def make_mesh(mesh_config, devices=None):
  """A `Mesh` over `devices` (default: all) with axes ('data', 'fsdp', 'tensor')."""
  devices = jax.devices() if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  try:
    device_grid = jax.experimental.mesh_utils.create_device_mesh(
        [shape[axis] for axis in MESH_AXES], devices=devices)
  except (AssertionError, NotImplementedError, ValueError):
    device_grid = np.asarray(devices).reshape([shape[axis] for axis in MESH_AXES])
  return Mesh(device_grid, MESH_AXES)


def logical_shardings(abstract_tree, mesh, rules):
  """NamedShardings for a tree of `nn.LogicallyPartitioned` (or plain) abstract values."""
  logical_specs = nn.get_partition_spec(abstract_tree)
  return nn.logical_to_mesh_sharding(logical_specs, mesh, rules)


def check_divisible(abstract_tree, shardings):
  """Fails naming the parameter when a sharded dimension does not split evenly over its axes."""
  def check(path, leaf, named_sharding):
    for dim, (size, axes) in enumerate(zip(leaf.shape, named_sharding.spec)):
      names = (axes,) if isinstance(axes, str) else tuple(axes or ())
      shards = math.prod(named_sharding.mesh.shape[name] for name in names)
      if size % shards:
        raise ValueError(
            f'{jax.tree_util.keystr(path)} has shape {leaf.shape}: dimension {dim} ({size}) '
            f'does not split evenly over mesh axes {names} ({shards} shards); change '
            'mesh.shape or mesh.axis_rules (or the model size)')
  jax.tree_util.tree_map_with_path(check, abstract_tree, shardings)
