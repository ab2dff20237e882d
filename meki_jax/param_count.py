"""Shape-only parameter accounting: RAM (inference, after the fold), ROM (token-indexed tables
read by row: MeKi's folded tables, the PLE table, Engram's n-gram tables) and training-only
parameters (those the fold removes). Nothing is allocated: shapes come from `jax.eval_shape` of
the model's init."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from meki_jax.model.transformer import build_model

ROM_TABLES = ('folded_memory', 'per_layer_table', 'ngram_table')  # parameter names


def abstract_params(model_config, folded=False):
  """The parameter tree as ShapeDtypeStructs (unboxed), for the training or the folded form."""
  model = build_model(model_config, folded=folded)
  token_ids = jax.ShapeDtypeStruct((1, 1), jnp.int32)
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), token_ids)
  return nn.meta.unbox(variables['params'])


def _sizes(tree):
  """{path (a tuple of names): number of values} of every leaf."""
  return {tuple(key.key for key in path): math.prod(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def count_params(model_config):
  """{'ram_params', 'rom_params', 'train_params' (training-only), 'train_total_params'}.

  train_total = ram + train_params + the ROM tables trained as they are (PLE, Engram).
  """
  train = _sizes(abstract_params(model_config, folded=False))
  folded = _sizes(abstract_params(model_config, folded=True))
  rom = sum(size for path, size in folded.items() if path[-1] in ROM_TABLES)
  return dict(ram_params=sum(folded.values()) - rom, rom_params=rom,
              train_params=sum(size for path, size in train.items() if path not in folded),
              train_total_params=sum(train.values()))
