"""Trustworthy runs end to end: damaged checkpoints, a poisoned config.json, the lock, divergence,
Ctrl-C and a full disk (issue 14)."""

import os
import resource
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from meki_jax import run_config
from meki_jax.generate import load_params
from meki_jax.train import checkpoint, checksums
from meki_jax.train.errors import RunError
from meki_jax.train.loop import train
from meki_jax.train.metrics import read_metrics
from tests.train.test_loop import small_config
from tests.train.test_reliability_units import REPO, _holder



def _losses(workdir):
  return [(r['step'], r['loss']) for r in read_metrics(workdir) if 'loss' in r]


def _restore_unverified(state_dir):
  """What orbax alone restores from a step's state (no checksums), as numpy leaves by path."""
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      tree = checkpointer.restore(state_dir)
  except Exception:  # noqa: BLE001  (a flip orbax does notice)
    return None
  return {jax.tree_util.keystr(path, simple=True, separator='/'): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _changed_kinds(clean, state_dir):
  """{'params', 'mu', 'nu'}: the kinds of leaves whose restored values a flipped byte changed."""
  restored = _restore_unverified(state_dir)
  if restored is None:
    return set()
  changed = [path for path, value in restored.items()
             if not np.array_equal(value, clean[path], equal_nan=True)]
  return {'params' if path.startswith('params') else path.split('/')[3] for path in changed}


def _sweep(data_dir):
  """(file, offset) over the step's data files over 1 MiB (zstd-compressed chunks of params and
  moments, laid out differently from run to run), interleaved across the files."""
  paths = sorted((os.path.join(data_dir, name) for name in os.listdir(data_dir)
                  if os.path.getsize(os.path.join(data_dir, name)) > 1 << 20),
                 key=os.path.getsize, reverse=True)
  for fraction in (0.3, 0.7, 0.1, 0.5, 0.9, 0.2, 0.4, 0.6, 0.8):
    for path in paths:
      yield path, int(fraction * os.path.getsize(path))


def _largest_file(directory):
  paths = [os.path.join(root, name) for root, _, names in os.walk(directory) for name in names]
  return max(paths, key=os.path.getsize)


def _flip(path, offset):
  with open(path, 'r+b') as stream:
    stream.seek(offset)
    byte = stream.read(1)[0]
    stream.seek(offset)
    stream.write(bytes([byte ^ 0x10]))


@pytest.mark.slow
def test_a_damaged_checkpoint_is_named_kept_aside_and_the_run_resumes_from_the_intact_one(
    tmp_path, capsys):
  workdir = tmp_path / 'run'
  train(small_config(4, checkpoint_every=2), str(workdir))
  uninterrupted = _losses(workdir)
  directory = str(workdir / 'checkpoints')
  assert checkpoint.saved_steps(directory) == [2, 4]
  state_dir = os.path.join(directory, '4', 'state')
  clean = _restore_unverified(state_dir)
  silently_changed, flips = set(), 0  # what orbax alone restores from a flipped byte, no error
  for data_file, offset in _sweep(os.path.join(state_dir, 'ocdbt.process_0', 'd')):
    _flip(data_file, offset)
    flips += 1
    assert checkpoint.verify_step(directory, 4) == (
        f'{data_file} does not match its checksum (its bytes changed after the save)')
    silently_changed |= _changed_kinds(clean, state_dir)
    _flip(data_file, offset)  # back
    if {'params', 'mu', 'nu'} <= silently_changed and flips >= 6:
      break
  assert {'params', 'mu', 'nu'} <= silently_changed, silently_changed
  assert checkpoint.verify_step(directory, 4) is None
  _flip(data_file, offset)  # kept: the resume must find it

  capsys.readouterr()
  load_params(small_config(4), str(workdir))  # generate's and the evaluation's restore
  assert (f'checkpoint step 4 is damaged and skipped: {data_file} does not match its checksum'
          in capsys.readouterr().err)
  train(small_config(4, checkpoint_every=2), str(workdir))
  err = capsys.readouterr().err
  damaged = workdir / checkpoint.DAMAGED / '4'
  assert (f'checkpoint step 4 is damaged ({data_file} does not match its checksum (its bytes '
          f'changed after the save)); moved to {damaged} and skipped: resuming from step 2') in err
  assert os.path.isdir(damaged) and checksums.verify(str(damaged)) is not None  # kept, as it was
  assert checkpoint.saved_steps(directory) == [2, 4]
  assert checkpoint.verify_step(directory, 4) is None  # saved again by the resumed run
  assert _losses(workdir) == uninterrupted  # steps 3-4 bit for bit, each step logged once

  # A failed resume leaves no config.json of the wrong model behind.
  os.remove(workdir / 'config.json')
  other = small_config(6, checkpoint_every=2)
  other.model.meki.d_mem = 16
  with pytest.raises(ValueError, match='cannot be restored into this model/config'):
    train(other, str(workdir))
  assert not (workdir / 'config.json').exists()

  assert train(small_config(4, checkpoint_every=2), str(workdir)) == {}  # a finished run
  assert ('checkpoint step 4 already reaches train.num_steps=4; nothing to train'
          in capsys.readouterr().err)
  assert run_config.load(str(workdir)).model.meki.d_mem == 8

  for step in (2, 4):  # nothing intact at all: an error, not a silent fresh start
    _flip(_largest_file(os.path.join(directory, str(step), 'state')), 100)
  with pytest.raises(RunError, match=r'no checkpoint in .* passes verification: step 4: .*; '
                                     r'step 2: .*Nothing was changed'):
    train(small_config(6, checkpoint_every=2), str(workdir))
  assert checkpoint.saved_steps(directory) == [2, 4]


def test_a_running_trainer_keeps_a_second_one_out(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(RunError, match=f'another trainer is using this workdir: .* pid '
                                       f'{holder.pid} on host'):
      train(small_config(2), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  assert not (tmp_path / 'config.json').exists()


def test_evaluation_data_without_loss_tokens_fails_before_step_1(tmp_path):
  config = small_config(2)
  config.data.eval_fraction = 1e-9  # holds out no document of the corpus
  with pytest.raises(ValueError, match='the evaluation data has no loss tokens'):
    train(config, str(tmp_path))
  assert not (tmp_path / 'config.json').exists() and not (tmp_path / 'checkpoints').exists()


def test_nonfinite_values_are_named():
  tree = {'params': {'a': jnp.ones(3), 'b': jnp.array([1.0, jnp.nan])},
          'opt_state': {'mu': jnp.array([jnp.inf]), 'count': jnp.zeros((), jnp.int32)}}
  assert checkpoint.nonfinite_leaves(tree) == ['opt_state/mu', 'params/b']


@pytest.mark.slow
def test_a_nonfinite_loss_stops_training_and_nothing_is_saved(tmp_path):
  config = small_config(4, checkpoint_every=1)
  config.model.init_std = 1e30  # finite parameters whose logits overflow
  with pytest.raises(RunError, match=r'step 1: the loss \((nan|inf)\) or gradient norm .* of '
                                     r'steps 1-1 is not finite; training stopped without saving'):
    train(config, str(tmp_path))
  assert checkpoint.saved_steps(str(tmp_path / 'checkpoints')) == []


def _start(config_text, workdir, preexec_fn=None):
  config_file = workdir.parent / 'config.py'
  config_file.write_text('from tests.train.test_loop import small_config\n'
                         'def get_config():\n' + config_text)
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  return subprocess.Popen(
      [sys.executable, '-m', 'meki_jax.train', f'--config={config_file}', f'--workdir={workdir}'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      preexec_fn=preexec_fn)


def _wait_for_steps(process, workdir, steps):
  deadline = time.time() + 300
  while not (workdir / 'metrics.jsonl').exists() or len(read_metrics(workdir)) < steps:
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, f'training did not log {steps} steps within 300 s'
    time.sleep(0.2)


@pytest.mark.slow
def test_ctrl_c_saves_and_a_second_one_exits_at_once(tmp_path):
  workdir = tmp_path / 'run'
  process = _start('  return small_config(100_000, checkpoint_every=100_000)\n', workdir)
  _wait_for_steps(process, workdir, 3)
  process.send_signal(signal.SIGINT)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  assert 'Ctrl-C: saving a checkpoint after this step' in output
  saved = checkpoint.saved_steps(str(workdir / 'checkpoints'))
  assert len(saved) == 1 and 3 <= saved[0] < 100_000, output
  assert checkpoint.verify_step(str(workdir / 'checkpoints'), saved[0]) is None

  process = _start('  return small_config(100_000, checkpoint_every=100_000)\n', workdir)
  _wait_for_steps(process, workdir, saved[0] + 2)
  process.send_signal(signal.SIGINT)
  seen = ''
  while 'Ctrl-C: saving' not in seen:  # Python runs one handler for signals that arrive together
    line = process.stdout.readline()
    assert line, seen
    seen += line
  process.send_signal(signal.SIGINT)  # while it finishes the step
  output, _ = process.communicate(timeout=60)
  output = seen + output
  assert process.returncode == 130, output
  assert 'second Ctrl-C: exiting without saving' in output


def _limit_file_size():
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
  resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20))


@pytest.mark.slow
def test_a_failed_save_stops_the_run_with_one_message(tmp_path):
  workdir = tmp_path / 'run'
  process = _start('  return small_config(20, checkpoint_every=2, log_every=1)\n', workdir,
                   preexec_fn=_limit_file_size)  # the 19 MB embedding cannot be written
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 1, output
  lines = output.strip().splitlines()
  assert lines[-1].startswith('python -m meki_jax.train: error: saving checkpoint step 2 to '
                              f'{workdir / "checkpoints"} failed: '), output
  assert 'Training stopped; there is no complete checkpoint yet' in lines[-1]
  assert max(r['step'] for r in read_metrics(workdir)) <= 3, output  # stopped at once
  assert output.count('Traceback') <= 2 and len(lines) < 20, output
  assert checkpoint.saved_steps(str(workdir / 'checkpoints')) == []
  assert np.isfinite([loss for _, loss in _losses(workdir)]).all()
