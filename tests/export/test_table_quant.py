"""Table schemes: quantized rows dequantize within half a scale of the folded values, the byte
layout is the one the manifest describes, and bad schemes are refused naming the field."""

import numpy as np
import pytest

from meki_jax.export.table_quant import SchemeError, TableScheme


def folded_like_rows(shape, seed=0):
  """Rows of the scale folded tables have (alpha * RMSNorm: values of order 1), with some rows
  all zero and one large outlier per row."""
  rows = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  rows[0] = 0
  rows[..., 3] *= 40
  return rows


@pytest.mark.parametrize('scheme', [TableScheme('int8'), TableScheme('int4', 8),
                                    TableScheme('int4', 32)])
def test_quantized_rows_dequantize_within_half_a_scale(scheme):
  rows = folded_like_rows((50, 3, 32))  # [tokens, layers, d_mem]
  stored = scheme.encode(rows)
  assert stored.dtype == np.uint8 and stored.shape == (50, 3, scheme.stored_width(32))
  values, scales = scheme.split(stored, 32)
  qmax = 127 if scheme.name == 'int8' else 7
  groups = rows.reshape(scales.shape + (-1,))
  scales = scales.astype(np.float32)[..., None]
  assert (scales * qmax >= np.abs(groups).max(axis=-1, keepdims=True)).all()  # rounded up
  error = np.abs(scheme.decode(stored, 32) - rows).reshape(groups.shape)
  assert (error <= scales / 2).all(), (error / np.maximum(scales, 1e-30)).max()
  np.testing.assert_array_equal(scheme.decode(stored, 32)[0], 0)  # zero rows stay zero


def test_int8_layout_is_values_then_a_little_endian_float16_scale():
  rows = np.zeros((1, 1, 4), np.float32)
  rows[0, 0] = [1.0, -0.5, 0.25, 127 / 64]  # max / 127 = 2^-6, exact in float16
  stored = TableScheme('int8').encode(rows)[0, 0]
  assert stored[4:].tobytes() == np.array([2.0 ** -6], '<f2').tobytes()
  assert stored[:4].view(np.int8).tolist() == [64, -32, 16, 127]


def test_int4_layout_packs_two_values_a_byte_low_nibble_first():
  rows = np.array([[[7.0, -7.0, 1.0, 0.0]]], np.float32)  # one group of 4, scale 1
  stored = TableScheme('int4', 4).encode(rows)[0, 0]
  # q + 8: 15, 1, 9, 8 -> bytes 15 | 1 << 4 = 0x1f and 9 | 8 << 4 = 0x89, then the scale
  assert stored[:2].tolist() == [0x1F, 0x89]
  assert stored[2:].tobytes() == np.array([1.0], '<f2').tobytes()
  np.testing.assert_array_equal(TableScheme('int4', 4).decode(stored[None, None], 4), rows)


@pytest.mark.parametrize('name', ['float32', 'float16', 'bfloat16'])
def test_float_schemes_store_the_values_in_their_dtype(name):
  rows = folded_like_rows((5, 2, 8))
  scheme = TableScheme(name)
  stored = scheme.encode(rows)
  assert stored.dtype.name == name and stored.shape == rows.shape
  values, = scheme.split(stored, 8)
  assert values is stored
  np.testing.assert_array_equal(scheme.decode(stored, 8), stored.astype(np.float32))


def test_records_round_trip_and_bad_schemes_are_named():
  for scheme in (TableScheme('float16'), TableScheme('int8'), TableScheme('int4', 32)):
    assert TableScheme.from_record(scheme.record(), 'x') == scheme
  assert TableScheme('int4', 16).record() == {'name': 'int4', 'scale_dtype': 'float16',
                                              'group_size': 16}
  with pytest.raises(SchemeError, match="'int3' is not one of"):
    TableScheme('int3')
  with pytest.raises(SchemeError, match='int4 needs a positive group size'):
    TableScheme('int4')
  with pytest.raises(SchemeError, match='group_size=24 does not divide d_mem=32'):
    TableScheme('int4', 24).stored_width(32)
  with pytest.raises(SchemeError, match=r"memory.scheme=.*'group_size': 7.*int4 needs"):
    TableScheme.from_record({'name': 'int8', 'scale_dtype': 'float16', 'group_size': 7},
                            'memory.scheme')
  with pytest.raises(SchemeError, match=r"memory.scheme=.*'scale_dtype': 'float32'.*known"):
    TableScheme.from_record({'name': 'int8', 'scale_dtype': 'float32', 'group_size': None},
                            'memory.scheme')
  with pytest.raises(SchemeError, match='does not fit float16'):
    TableScheme('int8').encode(np.full((1, 1, 2), 1e9, np.float32))
