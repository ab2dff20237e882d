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
                         'model.loss_chunk_len', 'model.memory_mix', 'model.weight_grad_first')
# what a config.json written before a field existed stands for (configs/base.py's defaults)
ADDED_MODEL_DEFAULTS = dict(attention='auto', attention_block=512, loss_chunk_len=256,
                            memory_mix='auto', weight_grad_first=True)


def _upgrade(plain, path):
  """A config.json (at `path`) written before model.flavor, data.mask_eod_input, data.packing
  and the attention and loss fields existed -> today's keys (ADDED_MODEL_DEFAULTS for the latter).

  Such runs are the `paper` flavor with per-document packing; their `data.mask_eod_target`
  (loss masked where the TARGET is EOD) is replaced by today's Megatron semantics. Raises
  ValueError for an `authors_release` run from before data.packing: that flavor's network
  changed (its MeKi gate read the raw residual), so its checkpoints are not today's flavor.
  """
  model, data = plain.get('model'), plain.get('data')
  if model is not None:
    model.setdefault('flavor', 'paper')
    for key, value in ADDED_MODEL_DEFAULTS.items():
      model.setdefault(key, value)
  if data is not None and 'mask_eod_target' in data:
    del data['mask_eod_target']
    data.setdefault('mask_eod_input', True)
  if data is not None and 'packing' not in data:
    if model is not None and model['flavor'] == 'authors_release':
      raise ValueError(f'{path} is a model.flavor=authors_release run from before the flavor was '
                       'corrected (MeKi gate on the raw residual, positions reset per document): '
                       'today\'s flavor is a different network on the same parameters; train it '
                       'again in a new --workdir')
    data.pop('attention_per_document', None)
    data['packing'] = 'documents'
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
      saved = _upgrade(json.load(f), path)
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
  return ml_collections.ConfigDict(_from_plain(_upgrade(plain, path)))
