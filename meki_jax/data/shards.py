"""Token shards: ArrayRecord files with one document per record.

A record is the document's token ids as little-endian uint32 bytes, ending with the
end-of-document id. ArrayRecord gives grain random access to every document, so the global
shuffle and the per-process split are index arithmetic, not reads. ArrayRecord's writer opens
local files only: a shard written to gs:// is written locally and uploaded (files.Staged). Its
reader opens gs:// URLs itself (through google-cloud-cpp), so training reads shards from a bucket
as from a disk.
"""

import numpy as np
from array_record.python import array_record_module

from meki_jax import files

RECORD_DTYPE = np.dtype('<u4')
SUFFIX = '.array_record'


def encode_record(token_ids):
  return np.asarray(token_ids, RECORD_DTYPE).tobytes()


def decode_record(record, where='record'):
  """bytes -> int32 token ids [n]; fails naming `where` if the bytes are not uint32 tokens."""
  if len(record) % RECORD_DTYPE.itemsize:
    raise ValueError(f'{where}: {len(record)} bytes is not a whole number of uint32 tokens; '
                     'the shard is corrupt or not a meki-jax token shard')
  return np.frombuffer(record, RECORD_DTYPE).astype(np.int32)


class ShardWriter:
  """Writes documents to `path` (local or gs://) atomically: records go to a temporary local
  file that takes `path`'s place on close (files.Staged)."""

  def __init__(self, path):
    self._staged = files.Staged(path)
    self.path = self._staged.location
    self._writer = array_record_module.ArrayRecordWriter(str(self._staged.local), 'group_size:1')
    self.documents = 0
    self.tokens = 0

  def write(self, token_ids):
    self._writer.write(encode_record(token_ids))
    self.documents += 1
    self.tokens += len(token_ids)

  def close(self):
    self._writer.close()
    self._staged.commit()

  def abort(self):
    self._writer.close()
    self._staged.discard()

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is None:
      self.close()
    else:
      self.abort()


def resolve_shards(pattern):
  """A glob (or a single file) of ArrayRecord token shards, local or gs:// -> sorted paths;
  fails if none matches or one is empty."""
  paths = files.glob(pattern)
  if not paths:
    raise FileNotFoundError(f'no token shards match {pattern!r} (run tools/preprocess.py '
                            'to make them)')
  for path in paths:
    if files.size(path) == 0:
      raise ValueError(f'token shard {path} is empty (0 bytes): a write that never finished?')
  return paths
