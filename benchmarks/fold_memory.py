"""Folds a full-size config's memory layer by layer and reports time and peak host memory.

Shows that the vocabulary-chunked fold (meki_jax.fold.iter_folded_layer) runs for MeKi-4B on a
24 GB machine: only E_global, one layer's training parameters and one chunk of G's activations
are alive at once. Layer parameters are freshly initialised per layer (the values do not change
the cost); the folded rows go to a token-major [vocab, layers, d_mem] float16 memmap on disk.

  python benchmarks/fold_memory.py --config configs/meki_4b.py --layers 2
"""

import importlib.util
import os
import resource
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from meki_jax.fold import iter_folded_layer
from meki_jax.model.meki import MemoryMix


def _load_config(path):
  file_path, _, arg = path.partition(':')
  spec = importlib.util.spec_from_file_location('bench_config', file_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _peak_rss_gib():
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(config_path, num_layers, chunk_rows):
  model = _load_config(config_path).model
  vocab, d_model, d_mem = model.vocab_size, model.d_model, model.meki.d_mem
  num_layers = num_layers or model.num_layers
  embedding = jax.random.normal(jax.random.PRNGKey(0), (vocab, d_model)) * model.init_std
  module = MemoryMix(model)
  init = jax.jit(lambda key: module.init(key, jnp.zeros((1, 1), jnp.int32),
                                         jnp.zeros((1, 1, d_model)))['params'])
  print(f'{config_path}: vocab {vocab}, d_model {d_model}, d_mem {d_mem}, '
        f'folding {num_layers} of {model.num_layers} layers in chunks of {chunk_rows} rows')
  with tempfile.TemporaryDirectory() as tmp:
    out = np.lib.format.open_memmap(os.path.join(tmp, 'folded.npy'), mode='w+',
                                    dtype=np.float16, shape=(vocab, num_layers, d_mem))
    start = time.perf_counter()
    for layer in range(num_layers):
      layer_start = time.perf_counter()
      memory_params = jax.tree_util.tree_map(lambda x: x.unbox() if hasattr(x, 'unbox') else x,
                                             init(jax.random.PRNGKey(layer + 1)))
      for row, rows in iter_folded_layer(memory_params, embedding, model, chunk_rows):
        out[row:row + rows.shape[0], layer] = np.asarray(rows, np.float16)
      del memory_params
      print(f'  layer {layer}: {time.perf_counter() - layer_start:6.1f} s, '
            f'peak RSS {_peak_rss_gib():5.2f} GiB')
    seconds = time.perf_counter() - start
    out.flush()
  per_layer = seconds / num_layers
  print(f'fold: {per_layer:.1f} s/layer, {vocab * num_layers / seconds:,.0f} rows/s; '
        f'all {model.num_layers} layers ~ {per_layer * model.num_layers / 60:.1f} min; '
        f'peak RSS {_peak_rss_gib():.2f} GiB')


if __name__ == '__main__':
  import argparse
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/meki_4b.py')
  parser.add_argument('--layers', type=int, default=0, help='layers to fold (0 = all)')
  parser.add_argument('--chunk_rows', type=int, default=8192)
  args = parser.parse_args()
  sys.exit(main(args.config, args.layers, args.chunk_rows))
