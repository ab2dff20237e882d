"""Shared by the baseline tests: a jitted forward with random parameters, built once per config.

On CPU, XLA compiles a model's initializers slower than everything else these tests run, so
parameters are random values of the init's shapes (norm scales around 1, the rest around 0).
"""

import functools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from meki_jax.model.transformer import build_model


def moved(params, seed=1):
  """Parameters moved off their initial values (norm scales != 1, zero kernels != 0)."""
  leaves, treedef = jax.tree_util.tree_flatten(nn.meta.unbox(params))
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree_util.tree_unflatten(treedef, [
      leaf + 0.3 * jax.random.normal(key, leaf.shape) for leaf, key in zip(leaves, keys)])


def model_and_params(config):
  """(forward, params): the jitted (params, token_ids[, positions, segment_ids]) -> logits and
  random parameters, built once per config for the whole session."""
  return _cached_model_and_params(config.to_json())


@functools.lru_cache(maxsize=None)
def _cached_model_and_params(config_json):
  model = build_model(ml_collections.ConfigDict(json.loads(config_json)))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  rng = np.random.default_rng(0)
  params = jax.tree_util.tree_map_with_path(
      lambda path, leaf: jnp.asarray(float('scale' in path[-1].key) + 0.3 * rng.normal(
          size=leaf.shape), leaf.dtype), nn.meta.unbox(abstract['params']))
  return jax.jit(lambda p, *args: model.apply({'params': p}, *args)), params


def one_document(token_ids):
  """(positions, segment_ids) [batch, seq] of rows that each hold one document."""
  positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1]), token_ids.shape)
  return positions, jnp.ones_like(token_ids)


def rms_norm(x, scale, eps=1e-6):
  """RMSNorm in numpy, over the last axis."""
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale
