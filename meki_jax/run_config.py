"""A run's config beside its checkpoints: `<workdir>/config.json`.

The trainer writes it (process 0, atomically) so that tools reading a workdir (generate,
export, evaluation) need no `--config`, and a resume with a different model fails before any
checkpoint is touched.
"""

import json
import os
import tempfile

import ml_collections

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


def _upgrade(plain):
  """A config.json written before model.flavor and data.mask_eod_input existed -> today's keys.

  Such runs are the `paper` flavor with per-document attention; their `data.mask_eod_target`
  (loss masked where the TARGET is EOD) is replaced by today's Megatron semantics.
  """
  if 'model' in plain:
    plain['model'].setdefault('flavor', 'paper')
  data = plain.get('data')
  if data is not None and 'mask_eod_target' in data:
    del data['mask_eod_target']
    data.setdefault('mask_eod_input', True)
    data.setdefault('attention_per_document', True)
  return plain


def _differences(saved, current, prefix):
  """Dotted names whose values differ between two plain dicts."""
  names = []
  for key in sorted(set(saved) | set(current)):
    name = f'{prefix}.{key}'
    old, new = saved.get(key), current.get(key)
    if isinstance(old, dict) and isinstance(new, dict):
      names += _differences(old, new, name)
    elif old != new:
      names.append(f'{name}: {old!r} in the workdir, {new!r} now')
  return names


def save(config, workdir, write=True):
  """Writes `config` to <workdir>/config.json (temp + rename) if `write` (process 0).

  Raises ValueError, on every process, if the workdir already holds a config with a different
  model: its checkpoints would not restore into the new one.
  """
  path = os.path.join(workdir, FILENAME)
  plain = _to_plain(config)
  if os.path.exists(path):
    with open(path) as f:
      saved = _upgrade(json.load(f))
    changed = _differences(saved.get('model', {}), plain['model'], 'model')
    if changed:
      raise ValueError(f'{path} was written for a different model; use a new --workdir or '
                       'restore the fields: ' + '; '.join(changed))
  if not write:
    return
  os.makedirs(workdir, exist_ok=True)
  with tempfile.NamedTemporaryFile('w', dir=workdir, prefix='.config.', suffix='.json',
                                   delete=False) as f:
    json.dump(plain, f, indent=2, sort_keys=True)
  os.replace(f.name, path)


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
