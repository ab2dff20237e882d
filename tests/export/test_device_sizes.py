"""The size rules: an fp32 program holds the RAM parameters count_params counts, the tables'
bytes are those of the files an export writes, and 8da4w's arithmetic for a small model."""

import pytest

from configs import dense_0p6b, meki_1p7b
from meki_jax.export import device_sizes, exporter, memory_store, table_quant
from meki_jax.param_count import count_params
from tests.export.conftest import moved_params


@pytest.mark.parametrize('config_module', [dense_0p6b, meki_1p7b])
def test_an_fp32_program_holds_the_ram_parameters(config_module):
  model = config_module.get_config().model
  assert device_sizes.program_bytes(model.to_dict(), 'fp32') == 4 * count_params(model)[
      'ram_params']


@pytest.mark.parametrize('scheme', [table_quant.TableScheme('float16'),
                                    table_quant.TableScheme('int8'),
                                    table_quant.TableScheme('int4', 4)])
def test_table_bytes_are_the_bytes_of_the_shard_files(tiny_model_config, tmp_path, scheme):
  config = tiny_model_config()
  manifest = exporter.export_folded(moved_params(config), config, tmp_path / 'out',
                                    dtype=scheme.name, table_group_size=4, rows_per_shard=40)
  written = sum(shard['bytes'] for shard in manifest['memory']['shards'])
  assert len(manifest['memory']['shards']) == len(memory_store.shard_ranges(97, 40)) == 3
  assert device_sizes.table_bytes(config.to_dict(), scheme, rows_per_shard=40) == written


def test_8da4w_bytes_of_a_small_model(tiny_model_config):
  """2 layers, d 32, 4 heads x 8, 2 kv heads, d_ff 64, d_mem 8, vocab 97; groups of 8."""
  config = tiny_model_config().to_dict()
  per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32 * 8  # q k v o, FFN, MeKi
  linear = 2 * per_layer + 97 * 32  # + the untied output projection
  norms = 2 * (2 * 32 + 2 * 8 + 32) + 32  # per layer: 2 RMSNorms, q/k norms, MeKi's; final
  expected = linear // 2 + 2 * (linear // 8) + (97 * 32 + 4 * 97) + 4 * norms
  assert device_sizes.program_bytes(config, '8da4w+8w', group_size=8) == expected
  with pytest.raises(ValueError, match='group_size=16 does not divide the input width of 2 '):
    device_sizes.program_bytes(config, '8da4w+8w', group_size=16)
  with pytest.raises(ValueError, match='group_size=0: weights per scale must be at least 1'):
    device_sizes.program_bytes(config, '8da4w+8w', group_size=0)
