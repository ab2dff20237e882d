"""Re-parameterisation (spec section 3): training parameters -> inference parameters.

For every layer l and every vocabulary row at once,
    M~_l = alpha_l * RMSNorm_mix(M_l + beta_l * G_l(E_global))          [vocab, d_mem]
computed in vocabulary chunks so peak memory is one chunk of G's activations, not V of them.
The folded tree drops `layers/meki/memory` (M, G, alpha, beta, mix_norm) and adds
`layers/meki/folded_memory` [num_layers, vocab, d_mem]; everything else is unchanged, including
the PLE and Engram baselines' parameters, which pass through as they are: their tables are
already token-indexed and their projections stay in the inference model.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from meki_jax.model.meki import MemoryMix
from meki_jax.model.transformer import meki_enabled

DEFAULT_CHUNK_ROWS = 8192


def _fold_module(model_config):
  """MemoryMix computing in float32: the fold is done once, so it is done exactly."""
  config = ml_collections.ConfigDict(model_config.to_dict())
  config.dtype = 'float32'
  return MemoryMix(ml_collections.FrozenConfigDict(config))


@functools.partial(jax.jit, static_argnames=('module',))
def _fold_chunk(module, memory_params, vocab_start, embed_chunk):
  return module.apply({'params': memory_params}, vocab_start, embed_chunk,
                      method=MemoryMix.fold_rows)


def iter_folded_layer(memory_params, embedding, model_config, chunk_rows=DEFAULT_CHUNK_ROWS):
  """Yields (vocab_start, rows) covering M~_l for one layer, rows: [<= chunk_rows, d_mem] f32.

  memory_params: one layer's `meki/memory` parameters (no leading layers axis);
  embedding: E_global [vocab, d_model].
  """
  if chunk_rows <= 0:
    raise ValueError(f'chunk_rows={chunk_rows} must be positive')
  module = _fold_module(model_config)
  vocab = embedding.shape[0]
  for start in range(0, vocab, chunk_rows):
    stop = min(start + chunk_rows, vocab)
    embed_chunk = jnp.asarray(embedding[start:stop], jnp.float32)  # [chunk, d_model]
    yield start, _fold_chunk(module, memory_params, start, embed_chunk)


def layer_slice(tree, layer):
  """The parameters of one scanned layer: every leaf indexed at `layer` on its leading axis."""
  return jax.tree_util.tree_map(lambda leaf: leaf[layer], tree)


def fold_params(params, model_config, chunk_rows=DEFAULT_CHUNK_ROWS):
  """Training params (unboxed, scanned layout) -> folded inference params (numpy tables).

  Holds the full folded tables [num_layers, vocab, d_mem] in host memory; the exporter streams
  `iter_folded_layer` instead for models whose tables do not fit.
  """
  params = nn.meta.unbox(params)
  if not meki_enabled(model_config):
    return params
  memory = params['layers']['meki']['memory']
  embedding = params['embed']['embedding']
  num_layers, vocab = model_config.num_layers, model_config.vocab_size
  folded = np.empty((num_layers, vocab, model_config.meki.d_mem), np.float32)
  for layer in range(num_layers):
    for start, rows in iter_folded_layer(layer_slice(memory, layer), embedding, model_config,
                                         chunk_rows):
      folded[layer, start:start + rows.shape[0]] = np.asarray(rows)
  meki = {k: v for k, v in params['layers']['meki'].items() if k != 'memory'}
  meki['folded_memory'] = folded
  return {**params, 'layers': {**params['layers'], 'meki': meki}}
