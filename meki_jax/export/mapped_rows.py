"""A token's stored rows read straight from memory-mapped shard files of a local memory.zarr.

The read a phone makes: one contiguous chunk per token, located by the shard's index and
checked against the chunk's crc32c, on the caller's thread. tensorstore reads the same bytes
through its thread pool, whose threads have gone to sleep between two decode steps. Measured
on the 2-core VM, MeKi-0.6B's int8 rows of one token (28 x 130 B), medians: through
tensorstore 0.13-0.18 ms right after another read and 1.15 ms in a decode loop with 80 ms
between steps (the benchmark's turns; most of what a MeKi step then cost over its dense
twin's); mapped here 0.014-0.031 ms and 0.37 ms (in that loop every first access after the
pause is slow: a small numpy op took 0.17 ms there).

The layout is the zarr3 `sharding_indexed` codec memory_store writes and checks at open: shard
i is memory.zarr/c/i/0/0, chunk j of a shard (token i * rows_per_shard + j) is
[1, num_layers, width] little-endian values followed by their crc32c (4 bytes, little-endian),
and the shard ends with its index, rows_per_shard (offset, nbytes) uint64 pairs followed by
their crc32c. A chunk never written (offset = nbytes = 2**64 - 1) reads as the fill value 0.
Values are read in the host's byte order (little-endian on x86 and ARM). Imports numpy,
google-crc32c and the standard library.
"""

import mmap
import pathlib

import google_crc32c
import numpy as np

MISSING = 2**64 - 1
CRC_BYTES = 4
INDEX_ENTRY = np.dtype('<u8')


class ShardError(ValueError):
  """A shard file that does not hold what its zarr.json and manifest say."""


def _checked(data, what):
  """data = payload + its crc32c -> the payload; fails naming `what` if they disagree."""
  payload, stored = data[:-CRC_BYTES], int.from_bytes(data[-CRC_BYTES:], 'little')
  if google_crc32c.value(payload) != stored:
    raise ShardError(f'{what}: crc32c mismatch')
  return payload


class MappedRows:
  """Rows [num_layers, width] of `dtype` per token from the shard files under `table_dir`
  (memory.zarr), each shard mapped and its index checked on first use."""

  def __init__(self, table_dir, shape, dtype, rows_per_shard):
    self.table_dir = pathlib.Path(table_dir)
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.rows_per_shard = rows_per_shard
    self.chunk_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
    self.shards = {}  # index -> (path, mmap, [rows_per_shard, 2] offsets and sizes)

  def shard(self, index):
    if index not in self.shards:
      path = self.table_dir / 'c' / str(index) / '0' / '0'
      try:
        with path.open('rb') as file:
          mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
      except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
        raise ShardError(f'{path}: cannot be mapped ({error})') from error
      index_bytes = self.rows_per_shard * 2 * INDEX_ENTRY.itemsize + CRC_BYTES
      if len(mapped) < index_bytes:
        raise ShardError(f'{path}: {len(mapped)} bytes, shorter than its index '
                         f'({index_bytes} bytes)')
      entries = _checked(mapped[-index_bytes:], f'{path}: the shard index')
      entries = np.frombuffer(entries, INDEX_ENTRY).reshape(self.rows_per_shard, 2)
      written = entries[:, 0] != MISSING
      ends = entries[written, 0] + entries[written, 1]
      if (entries[written, 1] != self.chunk_bytes + CRC_BYTES).any() or (
          ends > len(mapped) - index_bytes).any():
        raise ShardError(f'{path}: the shard index points outside the file or at chunks not '
                         f'of {self.chunk_bytes} + {CRC_BYTES} bytes')
      self.shards[index] = (path, mapped, entries)
    return self.shards[index]

  def read(self, token_ids):
    """token_ids [n] (int, checked to lie in the vocabulary) -> rows [n, num_layers, width]."""
    out = np.zeros((len(token_ids),) + self.shape[1:], self.dtype)
    for position, token in enumerate(token_ids):
      path, mapped, entries = self.shard(int(token) // self.rows_per_shard)
      offset, nbytes = entries[int(token) % self.rows_per_shard]
      if offset == MISSING:
        continue  # the fill value
      chunk = _checked(mapped[offset:offset + nbytes], f'{path}: the rows of token {token}')
      out[position] = np.frombuffer(chunk, self.dtype).reshape(self.shape[1:])
    return out
