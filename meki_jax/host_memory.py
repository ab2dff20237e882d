"""Folded memory tables kept off the accelerator and read ahead by token id (spec section 3).

A phone keeps the tables M~ in flash; here they live in a token-major [vocab, num_layers, d_mem]
array on the host (a memory-mapped .npy file), so one token's rows for every layer are one
contiguous read of num_layers x d_mem values. Inside a jitted step the read starts as soon as
the step's token ids exist (its first operation) and runs in a background thread while the
device embeds the tokens and runs the first attention; the first MeKi branch waits for the rows
only where it uses them (`DecoderLayer` calls the row function with the branch's input).
"""

import concurrent.futures
import os
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np


class HostMemory:
  """Token-major folded tables [vocab, num_layers, d_mem] in host memory or memory-mapped."""

  def __init__(self, table):
    if np.ndim(table) != 3:
      raise ValueError(f'host memory table has shape {np.shape(table)}; expected '
                       '[vocab, num_layers, d_mem]')
    self.table = table
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='meki-memory-prefetch')
    self._pending = {}  # token ids (bytes) -> future of their rows [L, batch, seq, d_mem]
    self._lock = threading.Lock()

  @property
  def vocab_size(self):
    return self.table.shape[0]

  @property
  def num_layers(self):
    return self.table.shape[1]

  @property
  def d_mem(self):
    return self.table.shape[2]

  def rows(self, token_ids):
    """token_ids [batch, seq] -> rows [num_layers, batch, seq, d_mem] (one read per token)."""
    ids = np.asarray(token_ids)
    rows = np.asarray(self.table[ids.reshape(-1)])  # [batch * seq, num_layers, d_mem]
    return np.moveaxis(rows.reshape(ids.shape + rows.shape[1:]), -2, 0)

  def device_rows(self, token_ids):
    """For use inside jit: a function (layer, hidden) -> M~_layer[token_ids] [batch, seq, d_mem].

    Starts the read of every layer's rows now. The first call (layer 0) waits for all of them,
    and depends on `hidden` (the MeKi branch's input) so that XLA cannot hoist the wait before
    that layer's attention; later layers slice the rows already on the device. One wait, not
    one per layer: on CPU each host callback between device ops costs up to ~1 ms.

    Both callbacks are pure as far as their results go (the wait returns table[token_ids]
    whether or not a read was started), so `jax.pure_callback` serves; it measured ~1 ms per
    step cheaper than `io_callback` on 2 CPU cores.
    """
    started = jax.pure_callback(self._start, jax.ShapeDtypeStruct((), jnp.int32), token_ids)
    shape = jax.ShapeDtypeStruct((self.num_layers,) + token_ids.shape + (self.d_mem,),
                                 self.table.dtype)
    rows = []  # all layers' rows, [num_layers, batch, seq, d_mem], once traced

    def layer_rows(layer, hidden):
      if not rows:
        after = hidden[:1, :1, :1]  # a data dependency only: the wait happens at this layer
        rows.append(jax.pure_callback(self._take, shape, token_ids, started, after))
      return rows[0][layer]

    return layer_rows

  def _start(self, token_ids):
    token_ids = np.array(token_ids)
    future = self._executor.submit(self.rows, token_ids)
    with self._lock:
      self._pending[token_ids.tobytes()] = future
    return np.int32(0)

  def _take(self, token_ids, started, after):
    del started, after
    token_ids = np.asarray(token_ids)
    with self._lock:
      future = self._pending.pop(token_ids.tobytes(), None)
    return self.rows(token_ids) if future is None else future.result()

  def close(self):
    self._executor.shutdown(wait=True)


def split_folded_tables(folded_params):
  """Folded Transformer params -> (params without `folded_memory`, tables [L, vocab, d_mem])."""
  meki = dict(folded_params['layers']['meki'])
  if 'folded_memory' not in meki:
    raise ValueError("params['layers']['meki'] has no 'folded_memory': host memory needs the "
                     'folded (inference) parameters, see meki_jax.fold.fold_params')
  tables = meki.pop('folded_memory')
  return {**folded_params, 'layers': {**folded_params['layers'], 'meki': meki}}, tables


def write_host_memory(tables, path, overwrite=False):
  """Writes tables [num_layers, vocab, d_mem] token-major to the .npy file `path` atomically.

  Returns the memory-mapped `HostMemory`. Refuses to replace an existing file unless
  `overwrite`. One layer at a time is copied, so peak host memory is one [vocab, d_mem] table.
  """
  path = pathlib.Path(path)
  if path.suffix != '.npy':
    raise ValueError(f'host memory path {path} must end in .npy')
  if path.exists() and not overwrite:
    raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
  num_layers, vocab, d_mem = tables.shape
  temporary = path.with_name(f'.{path.name}.{os.getpid()}.tmp')
  try:
    out = np.lib.format.open_memmap(temporary, mode='w+', dtype=np.dtype(tables.dtype),
                                    shape=(vocab, num_layers, d_mem))
    for layer in range(num_layers):
      out[:, layer] = np.asarray(tables[layer])
    out.flush()
    del out
    os.replace(temporary, path)
  finally:
    temporary.unlink(missing_ok=True)
  return open_host_memory(path)


def open_host_memory(path):
  """The `HostMemory` of a token-major .npy table, memory-mapped read-only."""
  return HostMemory(np.load(path, mmap_mode='r'))
