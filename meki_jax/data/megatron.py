"""Megatron-LM indexed datasets (`prefix.bin` + `prefix.idx`, the MMIDIDX format), via memmaps.

`prefix.idx` holds, little-endian: the 9-byte header b'MMIDIDX\\x00\\x00', version uint64 (1),
the token dtype's code uint8, the sequence count uint64 and the document count uint64, then
sizes int32[sequences] (tokens per sequence), pointers int64[sequences] (byte offsets into
`prefix.bin`) and document_indices int64[document count]: the first sequence of every document
followed by the sequence count, so there are document count - 1 documents. A document is one
sequence unless the corpus was split into sentences. `prefix.bin` is the sequences' tokens.
"""

import os
import struct

import numpy as np

HEADER = b'MMIDIDX\x00\x00'
VERSION = 1
# Megatron's dtype codes; 6 and 7 (float64, float32) cannot hold token ids.
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_PREAMBLE = struct.Struct('<9sQBQQ')  # header, version, dtype code, sequences, documents


def dataset_prefix(path):
  """'x.bin', 'x.idx' or 'x' -> 'x'."""
  path = os.fspath(path)
  root, extension = os.path.splitext(path)
  return root if extension in ('.bin', '.idx') else path


class MegatronDataset:
  """The documents of a Megatron indexed dataset; checks the index against both files' sizes."""

  def __init__(self, path):
    self.prefix = dataset_prefix(path)
    self.index_path, self.data_path = self.prefix + '.idx', self.prefix + '.bin'
    for file in (self.index_path, self.data_path):
      if not os.path.isfile(file):
        raise FileNotFoundError(f'Megatron dataset file {file} does not exist')
    with open(self.index_path, 'rb') as stream:
      preamble = stream.read(_PREAMBLE.size)
    if len(preamble) < _PREAMBLE.size:
      raise ValueError(f'{self.index_path}: {len(preamble)} bytes is shorter than the '
                       f'{_PREAMBLE.size}-byte MMIDIDX header: the index is truncated')
    header, version, code, sequences, documents = _PREAMBLE.unpack(preamble)
    if header != HEADER:
      raise ValueError(f'{self.index_path}: header {header!r} is not {HEADER!r}; not a '
                       'Megatron MMIDIDX index')
    if version != VERSION:
      raise ValueError(f'{self.index_path}: index version {version}, expected {VERSION}')
    if code not in DTYPES:
      raise ValueError(f'{self.index_path}: dtype code {code} is not an integer token dtype '
                       f'{sorted(DTYPES)}')
    self.dtype = np.dtype(DTYPES[code])
    expected = _PREAMBLE.size + sequences * (4 + 8) + documents * 8
    actual = os.path.getsize(self.index_path)
    if actual < expected:
      raise ValueError(f'{self.index_path}: {actual} bytes, but {sequences} sequences and '
                       f'{documents} document indices need {expected}: the index is truncated')
    index = np.memmap(self.index_path, np.uint8, mode='r')
    offset = _PREAMBLE.size
    self.sizes = index[offset:offset + 4 * sequences].view('<i4')  # [sequences]
    offset += 4 * sequences
    self.pointers = index[offset:offset + 8 * sequences].view('<i8')  # [sequences]
    offset += 8 * sequences
    self.document_indices = index[offset:offset + 8 * documents].view('<i8')  # [documents]
    self._check(sequences)
    has_data = os.path.getsize(self.data_path) > 0  # numpy cannot map an empty file
    self._tokens = (np.memmap(self.data_path, self.dtype, mode='r') if has_data
                    else np.zeros(0, self.dtype))  # [all tokens]

  def _check(self, sequences):
    starts = self.document_indices
    if not len(starts) or starts[0] != 0 or starts[-1] != sequences or np.any(np.diff(starts) < 0):
      raise ValueError(f'{self.index_path}: document_indices must rise from 0 to the sequence '
                       f'count {sequences}')
    item = self.dtype.itemsize
    if np.any(self.sizes < 0) or np.any(self.pointers % item):
      raise ValueError(f'{self.index_path}: negative sizes or pointers not aligned to the '
                       f'{self.dtype} tokens')
    ends = self.pointers + self.sizes.astype(np.int64) * item
    data_bytes = os.path.getsize(self.data_path)
    if sequences and ends.max() > data_bytes:
      raise ValueError(f'{self.data_path}: {data_bytes} bytes, but {self.index_path} points up '
                       f'to byte {int(ends.max())}: the data file is truncated')

  def __len__(self):
    return len(self.document_indices) - 1

  def __getitem__(self, document):
    """Document `document`'s token ids [tokens], its sequences concatenated."""
    first, last = self.document_indices[document], self.document_indices[document + 1]
    item = self.dtype.itemsize
    pieces = [self._tokens[pointer // item:pointer // item + size]
              for pointer, size in zip(self.pointers[first:last], self.sizes[first:last])]
    return np.concatenate(pieces) if pieces else np.zeros(0, self.dtype)
