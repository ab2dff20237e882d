"""Where the exporter's parameters come from: a checkpoint on disk, read array by array, or a tree.

A training checkpoint step directory (`<workdir>/checkpoints/<step>`) holds orbax's layout of the
TrainState in `state/`: `_METADATA` (JSON: the tree's keys, `use_ocdbt`, `use_zarr3`) and one
zarr array per leaf named by its path joined with '.' (`params.layers.mlp.gate.kernel`,
`opt_state.1.0.mu.…`), inside an OCDBT key-value store (`manifest.ocdbt`, `d/`,
`ocdbt.process_<i>/`) or, without OCDBT, in a directory per leaf. Its chunks are the shards of
the mesh that wrote it. `CheckpointParams` opens those arrays with tensorstore and reads
slices of `params.*` on demand; the optimizer moments are never opened. It depends on this
on-disk layout only (not on the training code), and ignores files it does not know.

`TreeParams` serves an in-memory parameter tree (unboxed numpy, scanned layout) through the same
three calls, `shape(path)`, `chunks(path)` and `read(path, index)`, so one exporter serves both.
`read_blocks` plans reads in whole chunks: a read that cuts a chunk decodes all of it anyway.
Shapes: `path` is a tuple of keys below `params` (e.g. ('layers', 'mlp', 'gate', 'kernel'));
leaves under 'layers' carry a leading [num_layers] axis.
"""

import itertools
import json
import math
import os
import pathlib
import sys

import numpy as np
import tensorstore as ts

from meki_jax.train import checksums


def workdir_of(path):
  """The training workdir of a step directory (<workdir>/checkpoints/<step>), else `path`."""
  path = pathlib.Path(path).absolute()
  if path.name.isdigit() and path.parent.name == 'checkpoints':
    return path.parent.parent
  return path


def checkpoint_step_dir(path):
  """A verified step directory: `path` itself (<workdir>/checkpoints/<step>) or a workdir's newest
  intact step.

  The step's files are checked against its checksum manifest (train/checksums.py) before
  anything is read. A damaged step named by `path` is refused; from a workdir, damaged newer
  steps are named on stderr and skipped, the rule of the trainer and of `generate`
  (checksums.newest_intact).
  """
  path = pathlib.Path(path).absolute()
  if path.name.isdigit() and (path / 'state').is_dir():
    problem = checksums.verify(str(path))
    if problem:
      raise ValueError(f'checkpoint {path} does not verify against its checksum manifest: '
                       f'{problem}')
    return path
  directory = path / 'checkpoints'
  steps = [int(p.name) for p in directory.glob('*') if p.name.isdigit() and (p / 'state').is_dir()]
  if not steps:
    raise FileNotFoundError(f'{path} is neither a checkpoint step directory '
                            '(<workdir>/checkpoints/<step>) nor a workdir with checkpoints')
  step, damaged = checksums.newest_intact(
      str(directory), steps, lambda parent, step: checksums.verify(os.path.join(parent, str(step))))
  for line in checksums.skipped(damaged):
    print(line, file=sys.stderr, flush=True)
  return directory / str(step)


class CheckpointParams:
  """The `params` leaves of a checkpoint step directory, read slice by slice from disk.

  `cache_bytes` sizes tensorstore's chunk cache (0: every read decodes the chunks it touches
  and drops them, so memory is one read's chunks and result).
  """

  def __init__(self, step_dir, cache_bytes=0):
    self.step_dir = checkpoint_step_dir(step_dir)
    self.state_dir = self.step_dir / 'state'
    metadata_path = self.state_dir / '_METADATA'
    try:
      metadata = json.loads(metadata_path.read_text())
      keys = [tuple(entry['key'] for entry in leaf['key_metadata'])
              for leaf in metadata['tree_metadata'].values()]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as error:
      raise ValueError(f'{metadata_path} is not an orbax PyTree checkpoint metadata file: '
                       f'{error!r}') from error
    self._ocdbt = bool(metadata.get('use_ocdbt', False))
    self._driver = 'zarr3' if metadata.get('use_zarr3', False) else 'zarr'
    self.paths = sorted(key[1:] for key in keys if key[0] == 'params')
    if not self.paths:
      raise ValueError(f'{metadata_path} lists no params/* arrays (keys: '
                       f'{sorted(set(key[0] for key in keys))})')
    # One chunk decoded at a time: a chunk of M spans all layers (MeKi-4B on 8 devices: 1.4 GB).
    self._context = ts.Context({'cache_pool': {'total_bytes_limit': int(cache_bytes)},
                                'data_copy_concurrency': {'limit': 1}})
    self._stores = {}

  @property
  def step(self):
    return int(self.step_dir.name)

  def _store(self, path):
    if path not in self._stores:
      if path not in self.paths:
        raise KeyError(f'{self.state_dir}: no array params/{"/".join(path)}')
      name = '.'.join(('params',) + tuple(path))
      if self._ocdbt:
        kvstore = {'driver': 'ocdbt', 'base': f'file://{self.state_dir}', 'path': f'{name}/'}
      else:
        kvstore = {'driver': 'file', 'path': f'{self.state_dir / name}/'}
      try:
        self._stores[path] = ts.open({'driver': self._driver, 'kvstore': kvstore}, open=True,
                                     read=True, context=self._context).result()
      except ValueError as error:
        raise ValueError(f'{self.state_dir}: params/{"/".join(path)} cannot be opened as a '
                         f'{self._driver} array: {error}') from error
    return self._stores[path]

  def shape(self, path):
    return tuple(self._store(path).shape)

  def chunks(self, path):
    """The shape of params/`path`'s stored chunks (the unit tensorstore decodes)."""
    return tuple(self._store(path).chunk_layout.read_chunk.shape)

  def read(self, path, index=()):
    """params/`path`[index] as a numpy array in the stored dtype.

    Only the chunks `index` touches are read, one at a time into the result: a read across
    chunks holds one chunk's compressed and decoded bytes at once, not all of theirs (a vocabulary
    shard of MeKi-4B's M across two 1.33 GiB chunks)."""
    store = self._store(path)
    index = index if isinstance(index, tuple) else (index,)
    # numpy semantics for slices: tensorstore refuses a stop beyond the array's bounds.
    index = tuple(slice(*part.indices(size)) if isinstance(part, slice) else part
                  for part, size in zip(index, store.shape))
    try:
      if not all(isinstance(part, slice) and part.step == 1 for part in index):
        return np.asarray(store[index].read().result())
      index += tuple(slice(0, size) for size in store.shape[len(index):])
      result = np.empty([max(0, part.stop - part.start) for part in index],
                        store.dtype.numpy_dtype)
      layout = store.chunk_layout
      for piece in _chunk_pieces(index, layout.read_chunk.shape, layout.grid_origin):
        result[tuple(slice(part.start - whole.start, part.stop - whole.start)
                     for part, whole in zip(piece, index))] = store[piece].read().result()
      return result
    except ValueError as error:  # a damaged chunk: zstd or crc failure, truncated data
      raise ValueError(f'{self.state_dir}: reading params/{"/".join(path)}[{index}]: '
                       f'{error}') from error


def _chunk_pieces(index, chunks, origin):
  """The parts of a box (a tuple of step-1 slices) that each lie in one chunk of the grid."""
  splits = []
  for part, chunk, start in zip(index, chunks, origin):
    first = start + ((part.start - start) // chunk + 1) * chunk  # the first edge past start
    edges = [part.start, *range(first, part.stop, chunk), part.stop]
    splits.append([slice(low, high) for low, high in zip(edges, edges[1:]) if high > low])
  return itertools.product(*splits)


class TreeParams:
  """An unboxed parameter tree (nested dicts of arrays) behind CheckpointParams' interface."""

  def __init__(self, params, step=None):
    self.tree = params
    self.step = step
    self.paths = sorted(_leaf_paths(params))

  def _leaf(self, path):
    node = self.tree
    for key in path:
      if not isinstance(node, dict) or key not in node:
        raise KeyError(f'params: no {"/".join(path)} (at {key!r})')
      node = node[key]
    return node

  def shape(self, path):
    return tuple(np.shape(self._leaf(path)))

  def chunks(self, path):
    """In memory, an array is one chunk."""
    return self.shape(path)

  def read(self, path, index=()):
    return np.asarray(np.asarray(self._leaf(path))[index])


def read_blocks(shape, chunks, max_bytes, itemsize=4):
  """Index tuples (of slices) covering an array of `shape` stored in `chunks`, in C order.

  Each block is whole chunks: one chunk, grown along the last axis, then (once that axis is
  whole) the one before, and so on, as long as it stays within `max_bytes`; a chunk larger than
  `max_bytes` is a block alone. Blocks at the array's far edges are cut by its bounds.
  """
  block = [max(1, min(chunk, size)) for chunk, size in zip(chunks, shape)]
  for axis in reversed(range(len(shape))):
    fits = max(1, max_bytes // (itemsize * math.prod(block)))
    block[axis] = min(shape[axis], block[axis] * fits)
    if block[axis] < shape[axis]:
      break
  starts = [range(0, size, step) for size, step in zip(shape, block)]
  return [tuple(slice(start, min(start + step, size))
                for start, step, size in zip(corner, block, shape))
          for corner in itertools.product(*starts)]


def _leaf_paths(tree, prefix=()):
  if not isinstance(tree, dict):
    return [prefix]
  return [path for key, value in tree.items() for path in _leaf_paths(value, prefix + (key,))]


def subtree(source, prefix, skip=()):
  """The leaves of `source` under `prefix`, read whole, as a nested dict (minus `skip` names)."""
  tree = {}
  for path in source.paths:
    if path[:len(prefix)] != tuple(prefix) or path[-1] in skip:
      continue
    node = tree
    for key in path[len(prefix):-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = source.read(path)
  return tree

