"""Configs that make no sense fail with a message naming the field; every shipped config loads."""

import importlib
import pathlib
import re

import ml_collections
import pytest

from configs import base
from meki_jax.config import ConfigError, validate
from meki_jax.model.transformer import check_token_ids

CONFIG_DIR = pathlib.Path(base.__file__).parent
CONFIG_NAMES = sorted(p.stem for p in CONFIG_DIR.glob('*.py') if p.stem not in ('__init__',))


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_shipped_configs_validate(name):
  validate(importlib.import_module(f'configs.{name}').get_config())


@pytest.mark.parametrize('field, value, message', [
    ('model.num_kv_heads', 3, 'model.num_heads=2 is not divisible by model.num_kv_heads=3'),
    ('model.meki.d_mem', -1, 'model.meki.d_mem=-1'),
    ('model.meki.memory', 'hybrid', "model.meki.memory='hybrid' is not one of"),
    ('model.meki.fusion', 'add_tanh', "model.meki.fusion='add_tanh'"),
    ('model.meki.position', 'before_attention', "model.meki.position='before_attention'"),
    ('model.meki.projection', 'mlp', "model.meki.projection='mlp'"),
    ('model.remat_policy', 'some', "model.remat_policy='some'"),
    ('model.remat_offload', ('layer_input', 'hidden'),
     "model.remat_offload=('layer_input', 'hidden') must be a tuple of distinct names"),
    # with q/k RMSNorm 'mlp' keeps neither q nor k: nothing of them to offload
    ('model.remat_offload', ('query',), "model.remat_policy='mlp' does not keep 'query'"),
    ('model.remat_offload', ('context',), "with model.attention='auto' (the splash kernel"),
    ('model.memory_mix', 'rows', "model.memory_mix='rows'"),
    ('model.dtype', 'int8', "model.dtype='int8'"),
    ('model.d_model', 0, 'model.d_model=0'),
    ('train.grad_accum_steps', 3, 'train.global_batch_size=256 is not divisible'),
    ('optim.end_lr', 1.0, 'optim.end_lr=1.0'),
    ('data.eod_id', 151_680, 'data.eod_id=151680 is outside the vocabulary'),
])
def test_nonsense_fails_naming_the_field(field, value, message):
  config = base.get_config()
  *parents, leaf = field.split('.')
  section = config
  for parent in parents:
    section = section[parent]
  section[leaf] = value
  with pytest.raises(ConfigError, match=re.escape(message)):
    validate(config)


@pytest.mark.parametrize('section, field', [('model', 'weight_grad_first'),
                                            ('optim', 'opt_state_on_host')])
def test_a_switch_read_from_json_must_be_a_boolean(section, field):
  """ml_collections refuses a string for a bool field; a hand-edited config.json does not."""
  config = base.get_config()
  config[section] = ml_collections.ConfigDict(dict(config[section].to_dict(), **{field: 'yes'}))
  with pytest.raises(ConfigError, match=f"{section}.{field}='yes' must be True or False"):
    validate(config)


def test_offloading_activations_needs_a_remat_policy():
  config = base.get_config()
  config.model.update(remat_policy='none', remat_offload=('layer_input',))
  with pytest.raises(ConfigError, match="needs a remat policy: model.remat_policy='none'"):
    validate(config)


@pytest.mark.parametrize('section, field, value, message', [
    ('ple', 'd_ple', 0, 'model.ple.d_ple=0 must be a positive integer'),
    ('engram', 'layers', (1, 28), r'model.engram.layers=\(1, 28\) must be a non-empty list'),
    ('engram', 'layers', (), r'model.engram.layers=\(\)'),
    ('engram', 'ngram_orders', (1, 2), r'model.engram.ngram_orders=\(1, 2\)'),
    ('engram', 'num_heads', 0, 'model.engram.num_heads=0'),
    ('engram', 'rows_per_head', 7, 'model.engram.rows_per_head=7 has 4 primes'),
    ('engram', 'rows_per_head', 2 ** 28, 'do not fit int32 row ids'),
])
def test_enabled_baselines_fail_naming_the_field(section, field, value, message):
  config = importlib.import_module(f'configs.{section}_0p6b').get_config()
  config.model[section][field] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_repro_variants_differ_only_in_the_storage_method():
  from configs import repro
  switches = {variant: (lambda m: (m.meki.enabled, m.meki.memory, m.ple.enabled,
                                   m.engram.enabled))(repro.get_config(variant).model)
              for variant in repro.VARIANTS}
  assert switches == {'dense': (False, 'both', False, False), 'meki': (True, 'both', False, False),
                      'static': (True, 'static', False, False),
                      'dynamic': (True, 'dynamic', False, False),
                      'ple': (False, 'both', True, False), 'engram': (False, 'both', False, True)}
  with pytest.raises(ValueError, match="configs/repro.py:moe"):
    repro.get_config('moe')


def test_variant_argument_sets_meki_fields_and_rejects_unknown_keys():
  from configs import meki_0p6b
  meki = meki_0p6b.get_config('memory=static,d_mem=96').model.meki
  assert (meki.memory, meki.d_mem, meki.enabled) == ('static', 96, True)
  with pytest.raises(ValueError, match="'size=3'"):
    meki_0p6b.get_config('size=3')


@pytest.mark.parametrize('name', ['meki_0p6b', 'meki_1p7b', 'meki_4b', 'dense_0p6b', 'dense_1p7b',
                                  'dense_4b', 'quickstart'])
def test_every_paper_size_config_takes_the_flavor(name):
  module = importlib.import_module(f'configs.{name}')
  paper, release = module.get_config(), validate(module.get_config('flavor=authors_release'))
  assert (paper.model.flavor, paper.model.qk_norm, paper.data.packing) == (
      'paper', True, 'documents')
  assert (release.model.flavor, release.model.qk_norm, release.data.packing) == (
      'authors_release', False, 'stream')
  assert release.data.mask_eod_input and paper.data.mask_eod_input  # every config, both flavors
  with pytest.raises(ConfigError, match="model.flavor='megatron' is not one of"):
    validate(module.get_config('flavor=megatron'))


def test_dense_configs_take_only_the_flavor():
  from configs import dense_0p6b
  with pytest.raises(ValueError, match="'d_mem=96'"):
    dense_0p6b.get_config('d_mem=96')


@pytest.mark.parametrize('field, value, message', [
    ('model.qk_norm', True, 'model.flavor=authors_release has no q/k RMSNorm'),
    ('model.meki.position', 'after_ffn', "model.meki.position='after_ffn', but the authors'"),
])
def test_release_flavor_fails_naming_what_it_lacks(field, value, message):
  from configs import meki_0p6b
  config = meki_0p6b.get_config('flavor=authors_release')
  section, leaf = field.rsplit('.', 1)
  (config.model if section == 'model' else config.model.meki)[leaf] = value
  with pytest.raises(ConfigError, match=message):
    validate(config)


def test_an_unknown_packing_is_named():
  config = base.get_config()
  config.data.packing = 'megatron'
  with pytest.raises(ConfigError, match=r"data.packing='megatron' is not one of "
                     r"\('documents', 'stream'\)"):
    validate(config)


def test_the_removed_eod_target_switch_fails_with_its_replacement():
  config = base.get_config()
  with config.unlocked():
    config.data.mask_eod_target = True
  with pytest.raises(ConfigError, match=r'data.mask_eod_target=True was removed.*'
                     r'data.mask_eod_input'):
    validate(config)


def test_token_id_out_of_range_names_the_id_and_its_index():
  with pytest.raises(ValueError, match=r'prompt: token id 151680 at index \(0, 2\)'):
    check_token_ids([[1, 2, 151_680]], 151_680, where='prompt')
  check_token_ids([[0, 151_679]], 151_680)
