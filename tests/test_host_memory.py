"""Host-resident folded tables: the token-major file, and decoding from it equals decoding from
tables on the device."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from meki_jax import decode, host_memory
from meki_jax.fold import fold_params
from meki_jax.model.transformer import build_model
from tests.test_decode import PROMPTS, _params


@pytest.fixture
def folded(tiny_model_config):
  config = tiny_model_config()
  return config, fold_params(_params(config), config)


def test_file_is_token_major_and_memory_mapped(folded, tmp_path):
  config, params = folded
  _, tables = host_memory.split_folded_tables(params)  # [layers, vocab, d_mem]
  memory = host_memory.write_host_memory(tables, tmp_path / 'tables.npy')
  assert isinstance(memory.table, np.memmap)
  np.testing.assert_array_equal(memory.table, np.transpose(tables, (1, 0, 2)))
  token_ids = np.array([[3, 96, 0], [5, 5, 41]])
  np.testing.assert_array_equal(memory.rows(token_ids), tables[:, token_ids])
  assert [p.name for p in tmp_path.iterdir()] == ['tables.npy']  # no temporary left behind


def test_existing_file_is_kept_without_overwrite(folded, tmp_path):
  _, tables = host_memory.split_folded_tables(folded[1])
  path = tmp_path / 'tables.npy'
  host_memory.write_host_memory(tables, path)
  with pytest.raises(FileExistsError, match='pass --overwrite'):
    host_memory.write_host_memory(tables * 2, path)
  np.testing.assert_array_equal(host_memory.open_host_memory(path).table[:, 0], tables[0])
  host_memory.write_host_memory(tables * 2, path, overwrite=True)
  np.testing.assert_array_equal(host_memory.open_host_memory(path).table[:, 0], tables[0] * 2)
  (tmp_path / 'user.npy').write_text('a file of the user')  # not an array: never replaced
  with pytest.raises(FileExistsError, match='user.npy exists and is not a host-memory table'):
    host_memory.write_host_memory(tables, tmp_path / 'user.npy', overwrite=True)
  assert (tmp_path / 'user.npy').read_text() == 'a file of the user'
  assert sorted(p.name for p in tmp_path.iterdir()) == ['tables.npy', 'user.npy']


class _ReadLog(host_memory.HostMemory):
  """Records the thread of every table read."""

  def __init__(self, table):
    super().__init__(table)
    self.threads = []

  def rows(self, token_ids):
    self.threads.append(threading.current_thread().name)
    return super().rows(token_ids)


def test_generation_reads_every_row_ahead_in_the_background(folded, tmp_path):
  config, params = folded
  stripped, tables = host_memory.split_folded_tables(params)
  memory = _ReadLog(host_memory.write_host_memory(tables, tmp_path / 'tables.npy').table)
  decode.generate(build_model(config, folded=True, decode=True),
                  decode.decode_params(stripped, config), PROMPTS, max_new_tokens=5,
                  prefill_chunk_len=4, memory=memory)
  # prefill: 7 prompt columns in chunks of 4 and 3; then 5 steps
  assert len(memory.threads) == 2 + 5
  assert all(name.startswith('meki-memory-prefetch') for name in memory.threads)
  memory.close()


def test_training_params_have_no_tables_to_move(tiny_model_config):
  config = tiny_model_config()
  with pytest.raises(ValueError, match="no 'folded_memory'"):
    host_memory.split_folded_tables(_params(config))


def test_host_tables_decode_exactly_as_device_tables(folded, tmp_path):
  config, params = folded
  stripped, tables = host_memory.split_folded_tables(params)
  memory = host_memory.write_host_memory(tables, tmp_path / 'tables.npy')
  model = build_model(config, folded=True, decode=True)
  on_device = decode.decode_params(params, config)
  on_host = decode.decode_params(stripped, config)
  assert 'folded_memory' not in on_host['layer_0']['meki']

  for sampling in (decode.Sampling(), decode.Sampling(temperature=1.0, top_k=30)):
    expected = decode.generate(model, on_device, PROMPTS, max_new_tokens=8, sampling=sampling)
    assert decode.generate(model, on_host, PROMPTS, max_new_tokens=8, sampling=sampling,
                           memory=memory) == expected

  batch = len(PROMPTS)
  token_ids, positions = jnp.array([4, 50, 96]), jnp.zeros(batch, jnp.int32)
  with pytest.raises(ValueError, match='pass memory=<their HostMemory>'):
    decode.generate(model, on_host, PROMPTS, max_new_tokens=2)
  with pytest.raises(ValueError, match=r'shape \(97, 3, 8\); .* need \(97, 2, 8\)'):
    decode.generate(model, on_host, PROMPTS, max_new_tokens=2, memory=host_memory.HostMemory(
        np.zeros((97, 3, 8), np.float32)))

  step = lambda params, memory: decode.decode_step(
      model, params, decode.init_cache(config, batch, 4), token_ids, positions,
      jax.random.PRNGKey(0), decode.Sampling(), memory)[1]
  np.testing.assert_array_equal(step(on_host, memory), step(on_device, None))
  memory.close()
