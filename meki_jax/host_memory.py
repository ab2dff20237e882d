"""Folded memory tables kept off the accelerator and read ahead by token id (spec section 3).

A phone keeps the tables M~ in flash; here they live in a token-major [vocab, num_layers, d_mem]
array on the host (a memory-mapped .npy file), so one token's rows for every layer are one
contiguous read of num_layers x d_mem values. The decode loop knows the next token ids on the
host as soon as a step returns (it checks them for end-of-document), so it starts that read in a
background thread (`prefetch`) before dispatching the next step; the read overlaps the dispatch,
the embedding and the first attention, and the first MeKi branch waits for the rows only where
it uses them (`DecoderLayer` calls the row function with the branch's input).
"""

import concurrent.futures
import pathlib
import threading

import jax
import jax.numpy as jnp
import numpy as np

from meki_jax import files


class HostMemory:
  """Token-major folded tables [vocab, num_layers, d_mem] in host memory or memory-mapped."""

  def __init__(self, table):
    if np.ndim(table) != 3:
      raise ValueError(f'host memory table has shape {np.shape(table)}; expected '
                       '[vocab, num_layers, d_mem]')
    self.table = table
    self._executor = concurrent.futures.ThreadPoolExecutor(
        max_workers=1, thread_name_prefix='meki-memory-prefetch')
    self._pending = None  # (key of token ids, future of their rows) of the one read ahead
    self._lock = threading.Lock()

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

  def prefetch(self, token_ids):
    """Starts reading the rows of token_ids [batch, seq] in a background thread.

    Call it as soon as the next step's token ids are on the host; that step's
    `device_rows` then takes these rows instead of reading them itself.
    """
    token_ids = np.array(token_ids, np.int32)
    future = self._executor.submit(self.rows, token_ids)
    with self._lock:
      self._pending = (_key(token_ids), future)

  def device_rows(self, token_ids):
    """For use inside jit: a function (layer, hidden) -> M~_layer[token_ids] [batch, seq, d_mem].

    The first call (layer 0) fetches every layer's rows with one host callback: the rows read
    ahead by `prefetch` if it was given these token ids, else a read now. The callback depends
    on `hidden` (the MeKi branch's input), so XLA runs it where layer 0 needs the rows, after
    the embedding and the first attention; without that dependency XLA runs it first and the
    read overlaps only the dispatch (a 20 ms read, 8 layers, 4K cache, 2 CPU cores: 12.5 ms
    added to the step this way, 17.5 ms without the dependency). Later layers slice the rows
    already on the device: one callback, not one per layer, because each host callback between
    device ops costs 0.3-2 ms on CPU.
    """
    shape = jax.ShapeDtypeStruct((self.num_layers,) + token_ids.shape + (self.d_mem,),
                                 self.table.dtype)
    rows = []  # all layers' rows, [num_layers, batch, seq, d_mem], once traced

    def layer_rows(layer, hidden):
      if not rows:
        after = hidden[:1, :1, :1]  # a data dependency only
        # pure: the result is table[token_ids] whether or not it was read ahead
        rows.append(jax.pure_callback(self._take, shape, token_ids.astype(jnp.int32), after))
      return rows[0][layer]

    return layer_rows

  def _take(self, token_ids, after):
    del after
    token_ids = np.asarray(token_ids)
    with self._lock:
      pending, self._pending = self._pending, None
    if pending is not None and pending[0] == _key(token_ids):
      return pending[1].result()
    return self.rows(token_ids)

  def close(self):
    self._executor.shutdown(wait=True)


def _key(token_ids):
  return token_ids.shape, token_ids.tobytes()


def split_folded_tables(folded_params):
  """Folded Transformer params -> (params without `folded_memory`, tables [L, vocab, d_mem])."""
  meki = dict(folded_params['layers']['meki'])
  if 'folded_memory' not in meki:
    raise ValueError("params['layers']['meki'] has no 'folded_memory': host memory needs the "
                     'folded (inference) parameters, see meki_jax.fold.fold_params')
  tables = meki.pop('folded_memory')
  return {**folded_params, 'layers': {**folded_params['layers'], 'meki': meki}}, tables


TABLE = files.Kind('host-memory table', magic=b'\x93NUMPY')  # a .npy file; what --overwrite replaces


def check_path(path, overwrite=False, sources=()):
  """Raises unless a host-memory table may be written to `path`: a .npy path that is no input
  (`sources`), replacing an existing file only with `overwrite` (files.check_output)."""
  if pathlib.Path(path).suffix != '.npy':
    raise ValueError(f'host memory path {path} must end in .npy')
  files.check_output(path, TABLE, overwrite=overwrite, sources=sources)


def write_host_memory(tables, path, overwrite=False, sources=()):
  """Writes tables [num_layers, vocab, d_mem] token-major to the .npy file `path` atomically.

  Returns the memory-mapped `HostMemory`. Refuses to replace an existing file unless
  `overwrite`, and then only a .npy file (files.replacing; `sources`: what `path` must stay clear
  of). One layer at a time is copied, so peak host memory is one [vocab, d_mem] table.
  """
  check_path(path, overwrite, sources)
  num_layers, vocab, d_mem = tables.shape
  with files.replacing(path, TABLE, overwrite=overwrite, sources=sources) as temporary:
    out = np.lib.format.open_memmap(temporary, mode='w+', dtype=np.dtype(tables.dtype),
                                    shape=(vocab, num_layers, d_mem))
    for layer in range(num_layers):
      out[:, layer] = np.asarray(tables[layer])
    out.flush()
    del out
  return open_host_memory(path)


def open_host_memory(path):
  """The `HostMemory` of a token-major .npy table, memory-mapped read-only."""
  return HostMemory(np.load(path, mmap_mode='r'))
