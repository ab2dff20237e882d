"""A token's stored rows read with one pread from the shard files of a local memory.zarr.

The read a phone makes: one contiguous chunk per token, located by the shard's index and
checked against the chunk's crc32c, on the caller's thread. tensorstore reads the same bytes
through its thread pool, whose threads have gone to sleep between two decode steps. Measured
on the 2-core VM, MeKi-0.6B's int8 rows of one token (28 x 130 B), medians: through
tensorstore 0.13-0.18 ms right after another read and 1.15 ms in a decode loop with 80 ms
between steps (the benchmark's turns; most of what a MeKi step then cost over its dense
twin's); read here 0.021-0.031 ms and 0.37 ms (in that loop every first access after the
pause is slow: a small numpy op took 0.17 ms there). pread, not a memory map: a mapping's
faulted-in file pages count in the process's RSS, 64 KB around each touched page (MeKi-0.6B's
process after 8K tokens: 1.09x the dense one's peak RSS with a map, 1.04x before it).

The layout is the zarr3 `sharding_indexed` codec memory_store writes and checks at open: shard
i is memory.zarr/c/i/0/0 (shard_path), chunk j of a shard (token i * rows_per_shard + j) is
[1, num_layers, width] little-endian values followed by their crc32c (4 bytes, little-endian),
and the shard ends with its index, rows_per_shard (offset, nbytes) uint64 pairs followed by
their crc32c. A chunk never written (offset = nbytes = 2**64 - 1) reads as the fill value 0.
Values are read in the host's byte order (little-endian on x86 and ARM). Imports numpy,
google-crc32c and the standard library.
"""

import os
import pathlib

import google_crc32c
import numpy as np

MISSING = 2**64 - 1


def shard_path(index):
  """The path of shard `index` inside memory.zarr (memory_store writes it there)."""
  return f'c/{index}/0/0'


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


class ShardReader:
  """Rows [num_layers, width] of `dtype` per token from the shard files under `table_dir`
  (memory.zarr), each shard opened and its index checked on first use."""

  def __init__(self, table_dir, shape, dtype, rows_per_shard):
    self.table_dir = pathlib.Path(table_dir)
    self.shape, self.dtype = tuple(shape), np.dtype(dtype)
    self.rows_per_shard = rows_per_shard
    self.chunk_bytes = int(np.prod(self.shape[1:])) * self.dtype.itemsize
    self.shards = {}  # index -> (path, file descriptor, [rows_per_shard, 2] offsets and sizes)

  def shard(self, index):
    if index not in self.shards:
      path = self.table_dir / shard_path(index)
      try:
        descriptor = os.open(path, os.O_RDONLY)
      except OSError as error:
        raise ShardError(f'{path}: cannot be opened ({error.strerror})') from error
      size = os.fstat(descriptor).st_size
      index_bytes = self.rows_per_shard * 2 * INDEX_ENTRY.itemsize + CRC_BYTES
      try:
        if size < index_bytes:
          raise ShardError(f'{path}: {size} bytes, shorter than its index ({index_bytes} '
                           'bytes)')
        entries = _checked(os.pread(descriptor, index_bytes, size - index_bytes),
                           f'{path}: the shard index')
        entries = np.frombuffer(entries, INDEX_ENTRY).reshape(self.rows_per_shard, 2)
        written = entries[:, 0] != MISSING
        ends = entries[written, 0] + entries[written, 1]
        if (entries[written, 1] != self.chunk_bytes + CRC_BYTES).any() or (
            ends > size - index_bytes).any():
          raise ShardError(f'{path}: the shard index points outside the file or at chunks '
                           f'not of {self.chunk_bytes} + {CRC_BYTES} bytes')
      except ShardError:
        os.close(descriptor)
        raise
      self.shards[index] = (path, descriptor, entries)
    return self.shards[index]

  def read(self, token_ids):
    """token_ids [n] (int, checked to lie in the vocabulary) -> rows [n, num_layers, width]."""
    out = np.zeros((len(token_ids),) + self.shape[1:], self.dtype)
    for position, token in enumerate(token_ids):
      path, descriptor, entries = self.shard(int(token) // self.rows_per_shard)
      offset, nbytes = entries[int(token) % self.rows_per_shard]
      if offset == MISSING:
        continue  # the fill value
      chunk = _checked(os.pread(descriptor, int(nbytes), int(offset)),
                       f'{path}: the rows of token {token}')
      out[position] = np.frombuffer(chunk, self.dtype).reshape(self.shape[1:])
    return out

  def __del__(self):
    for _, descriptor, _ in self.shards.values():
      os.close(descriptor)
