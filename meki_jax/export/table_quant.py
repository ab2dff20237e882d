"""How the folded tables M~ are stored for the device, and what the programs receive.

A token's rows of every layer, [num_layers, d_mem] float32, are stored in memory.zarr under one
of these schemes (chosen at `export_memory --dtype`):

  float32 | float16 | bfloat16   the values in that dtype: [L, m]; program input `memory_rows`
                                 [b, t, L, m] in that dtype.
  int8   per (token, layer) a float16 scale s >= max|row| / 127 and q = round(row / s) in
         [-127, 127]. Stored as uint8 [L, m + 2]: the int8 values, then the scale's two bytes
         (little-endian). Program inputs `memory_rows` int8 [b, t, L, m] and `memory_scales`
         float16 [b, t, L, 1].
  int4   per group of `group_size` consecutive values of a row a float16 scale s >= max|group|
         / 7 and q in [-7, 7], stored as q + 8 in four bits, two per byte (value 2i in the low
         nibble of byte i, value 2i + 1 in the high one). Stored as uint8 [L, m / 2 + 2 m / g]:
         the packed values, then the scales' bytes. Program inputs `memory_rows` uint8
         [b, t, L, m / 2] and `memory_scales` float16 [b, t, L, m / g].

Every scale is rounded up to float16 before the values are quantized, so q * s lies within s / 2
of the folded value. One token's bytes stay one contiguous chunk of memory.zarr (a phone reads
them in one go); the programs dequantize (export/device_model.py). Numpy and tensorstore (for
its bfloat16) only: the JAX exporter and the PyTorch side share it.
"""

import dataclasses

import numpy as np
import tensorstore as ts

FLOAT_DTYPES = {'float32': np.dtype(np.float32), 'float16': np.dtype(np.float16),
                'bfloat16': np.dtype(ts.bfloat16.numpy_dtype)}
FLOAT_SCHEMES = tuple(FLOAT_DTYPES)
SCHEMES = FLOAT_SCHEMES + ('int8', 'int4')
SCALE_DTYPE = np.dtype('<f2')
_QMAX = {'int8': 127, 'int4': 7}


class SchemeError(ValueError):
  """A table scheme or its record is invalid; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TableScheme:
  """A storage scheme of M~: `name` in SCHEMES; `group_size` (int4 only) divides d_mem."""
  name: str
  group_size: int = 0

  def __post_init__(self):
    if self.name not in SCHEMES:
      raise SchemeError(f'table scheme {self.name!r} is not one of {SCHEMES}')
    if (self.name == 'int4') != (self.group_size > 0):
      raise SchemeError(f'table scheme {self.name!r} with group_size={self.group_size}: int4 '
                        'needs a positive group size, the others none')
    if self.name == 'int4' and self.group_size % 2:
      raise SchemeError(f'int4 group_size={self.group_size} must be even (two values a byte)')

  @property
  def quantized(self):
    return self.name in _QMAX

  @property
  def storage_dtype(self):
    """The dtype of memory.zarr."""
    return np.dtype(np.uint8) if self.quantized else FLOAT_DTYPES[self.name]

  def check_width(self, d_mem):
    """Fails unless rows of d_mem values can be stored under this scheme."""
    if self.name == 'int4' and d_mem % self.group_size:
      raise SchemeError(f'int4 group_size={self.group_size} does not divide d_mem={d_mem}')

  def stored_width(self, d_mem):
    """Values (float schemes) or bytes (quantized) a token stores per layer."""
    self.check_width(d_mem)
    if self.name == 'int8':
      return d_mem + SCALE_DTYPE.itemsize
    if self.name == 'int4':
      return d_mem // 2 + SCALE_DTYPE.itemsize * (d_mem // self.group_size)
    return d_mem

  def scales_per_row(self, d_mem):
    """How many scales a (token, layer) row has: 1 for int8, d_mem / group_size for int4."""
    return 1 if self.name == 'int8' else d_mem // self.group_size

  def record(self):
    """The manifest's and device.json's description of the scheme."""
    record = {'name': self.name}
    if self.quantized:
      record.update(scale_dtype='float16', group_size=self.group_size or None)
    return record

  @classmethod
  def from_record(cls, record, where):
    """The scheme a manifest or device.json records; `where` names the field in errors."""
    if not isinstance(record, dict) or 'name' not in record:
      raise SchemeError(f'{where}={record!r} is not a table scheme record')
    try:
      scheme = cls(record['name'], record.get('group_size') or 0)
    except SchemeError as error:
      raise SchemeError(f'{where}={record!r}: {error}') from None
    if scheme.record() != record:
      raise SchemeError(f'{where}={record!r} does not describe a known scheme (expected '
                        f'{scheme.record()})')
    return scheme

  def encode(self, rows):
    """rows [..., L, m] (any float dtype) -> what memory.zarr stores [..., L, stored_width]."""
    rows = np.asarray(rows, np.float32)
    if not self.quantized:
      return rows.astype(self.storage_dtype)
    groups = self._grouped(rows)  # [..., L, groups, group]
    scales = _scales(np.abs(groups).max(axis=-1), _QMAX[self.name])  # [..., L, groups]
    safe = np.where(scales > 0, scales, 1).astype(np.float32)[..., None]
    values = np.clip(np.rint(groups / safe), -_QMAX[self.name], _QMAX[self.name])
    values = values.astype(np.int8).reshape(rows.shape)
    if self.name == 'int8':
      packed = values.view(np.uint8)
    else:
      nibbles = (values + 8).astype(np.uint8)
      packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
    return np.concatenate([packed, np.ascontiguousarray(scales).view(np.uint8)], axis=-1)

  def split(self, stored, d_mem):
    """What memory.zarr stores [..., L, width] -> the programs' memory inputs: (rows,) for a
    float scheme; (values, scales) as described in the module docstring when quantized."""
    if not self.quantized:
      return (stored,)
    value_bytes = d_mem if self.name == 'int8' else d_mem // 2
    values = stored[..., :value_bytes]
    values = values.view(np.int8) if self.name == 'int8' else values
    scales = np.ascontiguousarray(stored[..., value_bytes:]).view(SCALE_DTYPE)
    return np.ascontiguousarray(values), scales

  def decode(self, stored, d_mem):
    """What memory.zarr stores -> float32 rows [..., L, m]: the values the programs compute
    with (numpy mirror of device_model.dequantize_rows)."""
    if not self.quantized:
      return np.asarray(stored).astype(np.float32)
    values, scales = self.split(stored, d_mem)
    if self.name == 'int4':
      low, high = (values & 0xF).astype(np.int8) - 8, (values >> 4).astype(np.int8) - 8
      values = np.stack([low, high], axis=-1).reshape(values.shape[:-1] + (d_mem,))
    groups = values.astype(np.float32).reshape(scales.shape + (-1,))
    return (groups * scales.astype(np.float32)[..., None]).reshape(values.shape[:-1] + (d_mem,))

  def _grouped(self, rows):
    size = rows.shape[-1] if self.name == 'int8' else self.group_size
    self.check_width(rows.shape[-1])
    return rows.reshape(rows.shape[:-1] + (rows.shape[-1] // size, size))


def _scales(max_abs, qmax):
  """float16 scales s with s * qmax >= max_abs (rounded up), so no value is clipped by more
  than the rounding of its quotient."""
  with np.errstate(over='ignore'):
    scales = (max_abs / qmax).astype(SCALE_DTYPE)
  if not np.isfinite(scales).all():
    raise SchemeError(f'a row holds a value above {float(np.finfo(SCALE_DTYPE).max) * qmax:.4g} '
                      'in magnitude: its scale does not fit float16')
  low = scales.astype(np.float32) * qmax < max_abs
  scales[low] = np.nextafter(scales[low], SCALE_DTYPE.type(np.inf))
  return scales
