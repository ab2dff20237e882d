"""Spec Tables 5 and 2: RAM after the fold and ROM per size, in billions to two decimals."""

import pytest

from configs import (dense_1p7b, engram_0p6b, engram_1p7b, meki_0p6b, meki_1p7b, meki_4b,
                     ple_0p6b, ple_1p7b)
from meki_jax.param_count import count_params


@pytest.mark.parametrize('config_module, ram, rom', [
    (meki_0p6b, 0.60, 0.54), (meki_1p7b, 1.75, 1.09), (meki_4b, 4.12, 2.80)],
    ids=['0.6B', '1.7B', '4B'])
def test_table_5(config_module, ram, rom):
  counts = count_params(config_module.get_config().model)
  assert round(counts['ram_params'] / 1e9, 2) == ram
  assert round(counts['rom_params'] / 1e9, 2) == rom
  assert counts['train_total_params'] == counts['ram_params'] + counts['train_params']


def test_dense_twin_has_no_rom_and_the_same_backbone():
  dense = count_params(dense_1p7b.get_config().model)
  meki = count_params(meki_1p7b.get_config().model)
  assert dense['rom_params'] == dense['train_params'] == 0
  # RAM difference = W_gate + W_out + post_norm per layer: 28 x (2 x 2048 x 256 + 2048).
  assert meki['ram_params'] - dense['ram_params'] == 28 * (2 * 2048 * 256 + 2048)


@pytest.mark.parametrize('config_module, rom', [
    (ple_0p6b, 0.54), (ple_1p7b, 1.09), (engram_0p6b, 0.62), (engram_1p7b, 1.24)],
    ids=['PLE-0.6B', 'PLE-1.7B', 'Engram-0.6B', 'Engram-1.7B'])
def test_table_2_rom_of_the_baselines(config_module, rom):
  counts = count_params(config_module.get_config().model)
  assert round(counts['rom_params'] / 1e9, 2) == rom
  assert counts['train_params'] == 0  # nothing to fold: every table is trained as it is served
