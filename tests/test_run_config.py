"""<workdir>/config.json: round trip, refusal of a different model, clear errors."""

import json

import pytest

from configs import quickstart
from meki_jax import run_config
from meki_jax.config import validate
from meki_jax.sharding import axis_rules


def test_a_saved_config_loads_back_equal(tmp_path):
  config = quickstart.get_config()
  run_config.save(config, str(tmp_path))
  loaded = validate(run_config.load(str(tmp_path)))
  assert loaded.model.to_dict() == config.model.to_dict()
  assert loaded.train.to_dict() == config.train.to_dict()
  assert axis_rules(loaded.mesh) == axis_rules(config.mesh)
  assert loaded.data.train_sources[0]['path'] == config.data.train_sources[0]['path']


def test_a_different_model_is_refused_and_the_file_kept(tmp_path):
  run_config.save(quickstart.get_config(), str(tmp_path))
  before = (tmp_path / 'config.json').read_text()
  config = quickstart.get_config()
  config.model.meki.d_mem = 16
  with pytest.raises(ValueError, match=r'model\.meki\.d_mem: 32 in the workdir, 16 now'):
    run_config.save(config, str(tmp_path))
  assert (tmp_path / 'config.json').read_text() == before


def test_other_sections_may_change_on_resume(tmp_path):
  run_config.save(quickstart.get_config(), str(tmp_path))
  config = quickstart.get_config()
  config.train.num_steps = 999
  run_config.save(config, str(tmp_path))
  assert json.loads((tmp_path / 'config.json').read_text())['train']['num_steps'] == 999


def test_only_the_writing_process_writes(tmp_path):
  run_config.save(quickstart.get_config(), str(tmp_path), write=False)
  assert not (tmp_path / 'config.json').exists()


def test_missing_and_corrupt_files_name_the_path(tmp_path):
  with pytest.raises(FileNotFoundError, match='config.json does not exist: pass --config'):
    run_config.load(str(tmp_path))
  (tmp_path / 'config.json').write_text('{"model": ')
  with pytest.raises(ValueError, match='config.json is not valid JSON'):
    run_config.load(str(tmp_path))


def test_implementation_fields_may_change_and_old_files_get_their_defaults(tmp_path):
  """remat and its offload, attention, loss chunking, the memory mix and the weight-gradient
  order compute the same parameters: a resume may change them; a config.json written before
  they (or the state's memory placement) existed loads with configs/base.py's defaults."""
  config = quickstart.get_config()
  run_config.save(config, str(tmp_path))
  changed = quickstart.get_config()
  changed.model.update(remat_policy='full', attention='blocked', loss_chunk_len=64,
                       memory_mix='vocabulary', weight_grad_first=False,
                       remat_offload=('layer_input',))
  run_config.save(changed, str(tmp_path))
  plain = json.loads((tmp_path / 'config.json').read_text())
  for key in ('attention', 'attention_block', 'loss_chunk_len', 'memory_mix', 'weight_grad_first',
              'remat_offload'):
    del plain['model'][key]
  for key in ('params_on_host', 'opt_state_on_host'):
    del plain['optim'][key]
  (tmp_path / 'config.json').write_text(json.dumps(plain))
  loaded = validate(run_config.load(str(tmp_path)))
  assert (loaded.model.attention, loaded.model.attention_block, loaded.model.loss_chunk_len,
          loaded.model.memory_mix, loaded.model.weight_grad_first,
          loaded.model.remat_offload) == ('auto', 512, 256, 'auto', True, ())
  assert not loaded.optim.params_on_host and not loaded.optim.opt_state_on_host


def test_a_config_written_before_flavors_loads_as_the_paper_flavor(tmp_path):
  """Workdirs of earlier runs: no model.flavor, data.mask_eod_target (the old EOD loss)."""
  plain = json.loads(json.dumps(quickstart.get_config().to_dict()))
  del plain['model']['flavor'], plain['data']['mask_eod_input']
  del plain['data']['attention_per_document']
  plain['data']['mask_eod_target'] = True
  (tmp_path / 'config.json').write_text(json.dumps(plain))
  loaded = validate(run_config.load(str(tmp_path)))
  assert loaded.model.flavor == 'paper' and 'mask_eod_target' not in loaded.data
  assert loaded.data.mask_eod_input and loaded.data.attention_per_document
  run_config.save(quickstart.get_config(), str(tmp_path))  # a resume is the same model
