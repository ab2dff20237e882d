"""Matmul FLOPs of a traced program with every loop multiplied out: what a remat policy costs.

XLA's cost analysis of the compiled step cannot show it: it counts the body of a while loop once
(the layer scan, the loss's chunk scan) and a Pallas kernel as ~0 FLOPs (a splash attention
forward of 77 GFLOPs reports 34 MFLOPs). So the step's jaxpr, the program XLA compiles
(recomputation included: the backward pass of a remat'd layer holds its recomputed forward),
is walked instead, after dead-code elimination (jax's own, which XLA's matches: a remat'd
splash layer's backward holds a second forward kernel whose outputs are kept from the first; the
compiled program has one):
- dot_general counts 2 x (output elements) x (contracted elements);
- a scan's body counts `length` times; a conditional its largest branch;
- a shard_map body (per-device shapes) counts once per device of its manual mesh axes;
- a Pallas call counts its kernel body once per grid step the mask lets through: the splash
  kernels (model/splash.py) run over a square grid of (query, key) blocks under a causal mask,
  so n (n + 1) / 2 of the n x n block pairs;
- the bodies of every other call (jit, remat, custom_vjp/jvp) count once.
Elementwise work (norms, softmax, the optimizer) is not counted: it is a small fraction of the
step and the same under every policy.
"""

import math

import jax
from jax._src.interpreters import partial_eval  # dce_jaxpr: no public equivalent
from jax.extend import core

SPLASH_KERNEL_PREFIX = 'splash_mha'


def _sub_jaxprs(value):
  """The jaxprs in an equation parameter (a jaxpr, or a tuple of them)."""
  if isinstance(value, core.ClosedJaxpr):
    return [value.jaxpr]
  if isinstance(value, core.Jaxpr):
    return [value]
  if isinstance(value, (tuple, list)):
    return [jaxpr for item in value for jaxpr in _sub_jaxprs(item)]
  return []


def _dot_flops(equation):
  (contracting, _), _ = equation.params['dimension_numbers']
  lhs_shape = equation.invars[0].aval.shape
  contracted = math.prod(lhs_shape[axis] for axis in contracting)
  return 2 * math.prod(equation.outvars[0].aval.shape) * contracted


def _pallas_steps(equation):
  """Grid steps of a Pallas call that do work: all, or the causal ones of a splash kernel.

  A splash kernel's first operand is q [..., seq, head_dim] in blocks of `block` positions; its
  grid covers every (query block, key block) pair of the n = seq / block blocks once.
  """
  grid_mapping = equation.params['grid_mapping']
  steps = math.prod(grid_mapping.grid)
  if not str(equation.params['name']).startswith(SPLASH_KERNEL_PREFIX):
    return steps
  query = grid_mapping.block_mappings[0]
  blocks = query.array_aval.shape[-2] // query.block_shape[-2].block_size
  return steps // blocks**2 * blocks * (blocks + 1) // 2


def jaxpr_flops(jaxpr):
  """Matmul FLOPs of a (closed) jaxpr, loops multiplied out (see the module docstring)."""
  jaxpr = getattr(jaxpr, 'jaxpr', jaxpr)
  total = 0
  for equation in jaxpr.eqns:
    name = equation.primitive.name
    if name == 'dot_general':
      total += _dot_flops(equation)
    elif name == 'while':
      raise ValueError('a while loop of unknown trip count: its FLOPs cannot be multiplied out')
    elif name == 'cond':
      total += max(jaxpr_flops(branch) for branch in equation.params['branches'])
    elif name == 'pallas_call':
      total += jaxpr_flops(equation.params['jaxpr']) * _pallas_steps(equation)
    else:
      body = sum(jaxpr_flops(sub) for value in equation.params.values()
                 for sub in _sub_jaxprs(value))
      if name == 'scan':
        body *= equation.params['length']
      elif name == 'shard_map':
        mesh = equation.params['mesh']
        body *= math.prod(mesh.shape[axis] for axis in equation.params['newly_manual_axes'])
      total += body
  return total


def program_flops(function, *args):
  """Matmul FLOPs of `function(*args)` (arrays or jax.ShapeDtypeStruct) as jax traces it,
  without the work whose results nothing uses."""
  jaxpr = jax.make_jaxpr(function)(*args).jaxpr
  used, _ = partial_eval.dce_jaxpr(jaxpr, [True] * len(jaxpr.outvars))
  return jaxpr_flops(used)
