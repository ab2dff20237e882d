"""Shape-only parameter accounting: RAM (inference, after the fold), ROM (folded tables) and
training-only parameters (those the fold removes). Nothing is allocated: shapes come from
`jax.eval_shape` of the model's init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from meki_jax.model.transformer import build_model


def abstract_params(model_config, folded=False):
  """The parameter tree as ShapeDtypeStructs (unboxed), for the training or the folded form."""
  model = build_model(model_config, folded=folded)
  token_ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), token_ids)
  return nn.meta.unbox(variables['params'])


def _size(tree):
  return sum(math.prod(leaf.shape) for leaf in jax.tree_util.tree_leaves(tree))


def count_params(model_config):
  """{'ram_params', 'rom_params', 'train_params' (training-only), 'train_total_params'}."""
  train_total = _size(abstract_params(model_config, folded=False))
  folded = abstract_params(model_config, folded=True)
  rom = _size(folded['layers'].get('meki', {}).get('folded_memory', ()))
  ram = _size(folded) - rom
  return dict(ram_params=ram, rom_params=rom, train_params=train_total - ram,
              train_total_params=train_total)
