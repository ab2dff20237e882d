"""A run's config beside its checkpoints: `<workdir>/config.json`.

The trainer checks it before anything else (a resume with a different model fails before any
checkpoint is touched) and writes it (process 0, atomically, with the umask's mode) only once the
run has started or restored, so that tools reading a workdir (generate, export, evaluation) need
no `--config` and a failed start never leaves a config that does not match the checkpoints.
"""

import json
import os

import ml_collections

from meki_jax import files

FILENAME = 'config.json'


def _to_plain(value):
  """ConfigDict / tuple / list -> JSON-able dicts and lists."""
  if isinstance(value, (ml_collections.ConfigDict, dict)):
    return {key: _to_plain(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_to_plain(item) for item in value]
  return value


def _from_plain(value):
  """JSON lists -> tuples (configs hold sequences as tuples, the command line can set those)."""
  if isinstance(value, dict):
    return {key: _from_plain(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_from_plain(item) for item in value)
  return value


# model fields that choose how the same parameters are computed, not which parameters exist: a
# resume may change them (e.g. remat 'full' -> 'mlp' on a larger slice)
IMPLEMENTATION_FIELDS = ('model.remat_policy', 'model.attention', 'model.attention_block',
                         'model.loss_chunk_len', 'model.memory_mix', 'model.weight_grad_first',
                         'model.remat_offload')
# what a config.json written before a field existed stands for (configs/base.py's defaults)
ADDED_MODEL_DEFAULTS = dict(attention='auto', attention_block=512, loss_chunk_len=256,
                            memory_mix='auto', weight_grad_first=True, remat_offload=())
ADDED_OPTIM_DEFAULTS = dict(params_on_host=False, opt_state_on_host=False)


def _upgrade(plain):
  """A config.json written before model.flavor, data.mask_eod_input and the attention, loss and
  memory fields existed -> today's keys (ADDED_MODEL_DEFAULTS, ADDED_OPTIM_DEFAULTS for those).

  Such runs are the `paper` flavor with per-document attention; their `data.mask_eod_target`
  (loss masked where the TARGET is EOD) is replaced by today's Megatron semantics.
  """
  if 'model' in plain:
    plain['model'].setdefault('flavor', 'paper')
    for key, value in ADDED_MODEL_DEFAULTS.items():
      plain['model'].setdefault(key, value)
  for key, value in ADDED_OPTIM_DEFAULTS.items():
    plain.get('optim', {}).setdefault(key, value)
  data = plain.get('data')
  if data is not None and 'mask_eod_target' in data:
    del data['mask_eod_target']
    data.setdefault('mask_eod_input', True)
    data.setdefault('attention_per_document', True)
  return plain


def _differences(saved, current, prefix):
  """Dotted names whose values differ between two plain dicts (IMPLEMENTATION_FIELDS aside)."""
  names = []
  for key in sorted(set(saved) | set(current)):
    name = f'{prefix}.{key}'
    if name in IMPLEMENTATION_FIELDS:
      continue
    old, new = saved.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      names += _differences(old, new, name)
    elif old != new:
      names.append(f'{name}: {old!r} in the workdir, {new!r} now')
  return names


def check(config, workdir):
  """Raises ValueError if <workdir>/config.json was written for a different model: the
  workdir's checkpoints would not restore into this one."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    return
  with open(path) as f:
    try:
      saved = _upgrade(json.load(f))
    except json.JSONDecodeError as error:
      raise ValueError(f'{path} is not valid JSON: {error}') from error
  changed = _differences(saved.get('model', {}), _to_plain(config)['model'], 'model')
  if changed:
    raise ValueError(f'{path} was written for a different model; use a new --workdir or '
                     'restore the fields: ' + '; '.join(changed))


def save(config, workdir, write=True):
  """Writes `config` to <workdir>/config.json (temp + rename) if `write` (process 0).

  Raises ValueError, on every process, if the workdir already holds a config with a different
  model (see check).
  """
  check(config, workdir)
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  files.write_atomically(os.path.join(workdir, FILENAME),
                         json.dumps(_to_plain(config), indent=2, sort_keys=True),
                         prefix='.config.')


def load(workdir):
  """The ConfigDict saved in <workdir>/config.json."""
  path = os.path.join(workdir, FILENAME)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} does not exist: pass --config=configs/<the run>.py (runs '
                            'trained before the trainer wrote config.json have none)')
  with open(path) as f:
    try:
      plain = json.load(f)
    except json.JSONDecodeError as error:
      raise ValueError(f'{path} is not valid JSON: {error}') from error
  return ml_collections.ConfigDict(_from_plain(_upgrade(plain)))
