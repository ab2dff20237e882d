"""The run's record (<workdir>/config.json, <step>/config.json): round trip, refusal of a
different model, the settings a resume may change, clear errors."""

import json

import pytest

from configs import quickstart
from meki_jax import run_config
from meki_jax.config import validate
from meki_jax.sharding import axis_rules


def _write(config, directory):
  run_config.write(str(directory), run_config.record(config))


def test_a_saved_config_loads_back_equal(tmp_path):
  config = quickstart.get_config()
  _write(config, tmp_path)
  loaded = validate(run_config.load(str(tmp_path)))
  assert loaded.model.to_dict() == config.model.to_dict()
  assert loaded.train.to_dict() == config.train.to_dict()
  assert axis_rules(loaded.mesh) == axis_rules(config.mesh)
  assert loaded.data.train_sources[0]['path'] == config.data.train_sources[0]['path']


def test_a_different_model_is_refused(tmp_path):
  _write(quickstart.get_config(), tmp_path)
  config = quickstart.get_config()
  config.model.meki.d_mem = 16
  with pytest.raises(ValueError, match=r'model\.meki\.d_mem: 32 in the workdir, 16 now'):
    run_config.check(config, str(tmp_path))
  assert run_config.check(quickstart.get_config(), str(tmp_path))['model']['meki']['d_mem'] == 32
  assert run_config.check(config, str(tmp_path / 'new')) is None  # a new workdir


def test_a_checkpoint_record_refuses_a_same_shape_model_and_lists_other_changes(tmp_path):
  """A step's own record decides without <workdir>/config.json: model.meki.fusion changes no
  shape, so only the record tells the restore that the model differs."""
  _write(quickstart.get_config(), tmp_path)
  config = quickstart.get_config()
  config.model.meki.fusion = 'mul_silu'
  with pytest.raises(ValueError, match=r"written by a different model .*config.json\); use a new "
                                       r"--workdir or restore the fields: model.meki.fusion: "
                                       r"'add_sigmoid' there, 'mul_silu' now"):
    run_config.check_checkpoint(config, str(tmp_path))
  config = quickstart.get_config()
  config.data.seq_len, config.train.global_batch_size = 64, 16
  config.model.remat_policy = 'full'  # computes the same parameters
  config.train.init_from_hf = '/nonexistent'  # ignored by a resume: not a change
  saved, changes = run_config.check_checkpoint(config, str(tmp_path))
  assert changes == ['data.seq_len: 128 at the checkpoint, 64 now',
                     "model.remat_policy: 'none' at the checkpoint, 'full' now",
                     'train.global_batch_size: 8 at the checkpoint, 16 now']
  assert json.loads(run_config.record(config, saved))['train']['init_from_hf'] == ''
  assert json.loads(run_config.record(config))['train']['init_from_hf'] == '/nonexistent'
  assert run_config.check_checkpoint(config, str(tmp_path / 'old_step')) == (None, [])


def test_without_config_json_the_newest_step_record_is_loaded(tmp_path):
  for step, num_steps in ((2, 2), (10, 10)):
    config = quickstart.get_config()
    config.train.num_steps = num_steps
    _write(config, tmp_path / 'checkpoints' / str(step))
  assert run_config.load(str(tmp_path)).train.num_steps == 10


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
  _write(config, tmp_path)
  changed = quickstart.get_config()
  changed.model.update(remat_policy='full', attention='blocked', loss_chunk_len=64,
                       memory_mix='vocabulary', weight_grad_first=False,
                       remat_offload=('layer_input',))
  run_config.check(changed, str(tmp_path))
  _write(changed, tmp_path)
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
  del plain['model']['flavor'], plain['data']['mask_eod_input'], plain['data']['packing']
  plain['data']['mask_eod_target'] = True
  (tmp_path / 'config.json').write_text(json.dumps(plain))
  loaded = validate(run_config.load(str(tmp_path)))
  assert loaded.model.flavor == 'paper' and 'mask_eod_target' not in loaded.data
  assert loaded.data.mask_eod_input and loaded.data.packing == 'documents'
  run_config.check(quickstart.get_config(), str(tmp_path))  # a resume is the same model


def test_a_config_written_before_data_packing_loads_with_documents(tmp_path):
  plain = json.loads(json.dumps(quickstart.get_config().to_dict()))
  del plain['data']['packing']
  plain['data']['attention_per_document'] = True
  (tmp_path / 'config.json').write_text(json.dumps(plain))
  loaded = validate(run_config.load(str(tmp_path)))
  assert loaded.data.packing == 'documents' and 'attention_per_document' not in loaded.data


def test_an_authors_release_run_from_before_its_correction_is_refused(tmp_path):
  """Its gate read the raw residual: the same parameters are another network today."""
  plain = json.loads(json.dumps(quickstart.get_config('flavor=authors_release').to_dict()))
  del plain['data']['packing']
  plain['data']['attention_per_document'] = False
  (tmp_path / 'config.json').write_text(json.dumps(plain))
  for call in (lambda: run_config.load(str(tmp_path)),
               lambda: run_config.check(quickstart.get_config('flavor=authors_release'),
                                        str(tmp_path))):
    with pytest.raises(ValueError, match=r'config.json is a model.flavor=authors_release run '
                       'from before the flavor was corrected'):
      call()
