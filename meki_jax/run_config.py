"""A run's config, recorded in every checkpoint step and beside them as <workdir>/config.json.

The trainer writes `<step>/config.json` into each checkpoint step before the step's checksum
manifest (which covers it) and copies it to <workdir>/config.json once the step is committed
(train/checkpoint.py): only a run that saved a checkpoint leaves a record, and the record is
always that of a checkpoint. A resume is checked against <workdir>/config.json before anything
else, and against the step's own record before that step is restored, so a different model
(fields outside IMPLEMENTATION_FIELDS: a same-shape change such as model.meki.fusion included)
is refused with or without <workdir>/config.json. Other changes (data, batch size, sequence
length, schedule) are allowed and listed. Tools reading a workdir (generate, export, evaluation)
take the config from <workdir>/config.json (or the newest step's record) and need no `--config`.
"""

import json

import ml_collections

from meki_jax import files

FILENAME = 'config.json'
INIT_FROM_HF = 'train.init_from_hf'


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


def _upgrade(plain, path):
  """A config.json (at `path`) written before model.flavor, data.mask_eod_input, data.packing
  and the attention, loss and memory fields existed -> today's keys (ADDED_MODEL_DEFAULTS,
  ADDED_OPTIM_DEFAULTS for the latter).

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
  for key, value in ADDED_OPTIM_DEFAULTS.items():
    plain.get('optim', {}).setdefault(key, value)
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


def _read(path):
  """The upgraded plain dict of a config file, or None if there is none."""
  try:
    return _upgrade(json.loads(files.path(path).read_text(encoding='utf-8')), path)
  except FileNotFoundError:
    return None
  except (UnicodeDecodeError, json.JSONDecodeError) as error:
    raise ValueError(f'{path} is not valid JSON: {error}') from error


def _differences(saved, current, prefix=''):
  """[(dotted name, saved value, current value)] of the leaves that differ between plain dicts."""
  found = []
  for key in sorted(set(saved) | set(current)):
    name = f'{prefix}{key}'
    old, new = saved.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      found += _differences(old, new, name + '.')
    elif old != new:
      found.append((name, old, new))
  return found


def _is_model_change(difference):
  """Whether a difference changes which parameters the model has or what they compute."""
  name = difference[0]
  return name.startswith('model.') and name not in IMPLEMENTATION_FIELDS


def _describe(differences, where):
  return '; '.join(f'{name}: {old!r} {where}, {new!r} now' for name, old, new in differences)


def check(config, workdir):
  """The plain config of <workdir>/config.json (None if there is none), after checking that it
  was written for this model: raises ValueError naming the fields otherwise (the workdir's
  checkpoints would not restore into this model, or would compute another function)."""
  path = files.path(workdir) / FILENAME
  saved = _read(path)
  changed = [d for d in _differences(saved or {}, _to_plain(config)) if _is_model_change(d)]
  if saved is not None and changed:
    raise ValueError(f'{path} was written for a different model; use a new --workdir or '
                     'restore the fields: ' + _describe(changed, 'in the workdir'))
  return saved


def check_checkpoint(config, step_dir):
  """(the checkpoint's recorded config or None, [the other settings that changed, described])
  of a checkpoint step about to be resumed. Raises ValueError naming the model fields if the
  step was written by a different model, so it holds with or without <workdir>/config.json.
  train.init_from_hf is left out: a resume does not initialise (see `record`)."""
  path = files.path(step_dir) / FILENAME
  saved = _read(path)
  if saved is None:  # written before checkpoints recorded their config
    return None, []
  differences = _differences(saved, _to_plain(config))
  changed = [d for d in differences if _is_model_change(d)]
  if changed:
    raise ValueError(f'checkpoint {step_dir} was written by a different model ({path}); use a '
                     'new --workdir or restore the fields: ' + _describe(changed, 'there'))
  others = [d for d in differences if not _is_model_change(d) and d[0] != INIT_FROM_HF]
  return saved, [_describe([d], 'at the checkpoint') for d in others]


def record(config, resumed_from=None):
  """The JSON text a run records in its checkpoints and as <workdir>/config.json.

  resumed_from: the plain config the resumed run recorded (None for a new run, {} if unknown):
  its train.init_from_hf is kept, since a resume restores the checkpoint and ignores the flag.
  """
  plain = _to_plain(config)
  if resumed_from is not None:
    plain['train']['init_from_hf'] = resumed_from.get('train', {}).get('init_from_hf', '')
  return json.dumps(plain, indent=2, sort_keys=True)


def write(directory, text):
  """Writes a `record` to <directory>/config.json (temp + rename, the umask's mode)."""
  files.write_atomically(files.make_directory(directory) / FILENAME, text, prefix='.config.')


def load(workdir):
  """The ConfigDict of <workdir>/config.json, or if there is none (deleted, or a run that has not
  saved since) of the newest checkpoint step's record."""
  path = files.path(workdir) / FILENAME
  plain = _read(path)
  checkpoints = files.path(workdir) / 'checkpoints'  # train/checkpoint.py's layout
  steps = sorted((int(entry.name) for entry in checkpoints.iterdir() if entry.name.isdigit()),
                 reverse=True) if plain is None and checkpoints.is_dir() else []
  for step in steps:
    plain = _read(checkpoints / str(step) / FILENAME)
    if plain is not None:
      break
  if plain is None:
    raise FileNotFoundError(f'{path} does not exist: pass --config=configs/<the run>.py (runs '
                            'trained before the trainer wrote config.json have none)')
  return ml_collections.ConfigDict(_from_plain(plain))
