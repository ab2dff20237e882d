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

  # Without config.json the step's own record refuses a different model before the restore.
  os.remove(workdir / 'config.json')
  other = small_config(6, checkpoint_every=2)
  other.model.meki.d_mem = 16
  with pytest.raises(ValueError, match=r'checkpoint .*/4 was written by a different model .*'
                                       r'model.meki.d_mem: 8 there, 16 now'):
    train(other, str(workdir))
  assert not (workdir / 'config.json').exists()

  assert train(small_config(4, checkpoint_every=2), str(workdir)) == {}  # a finished run
  assert ('checkpoint step 4 already reaches train.num_steps=4; nothing to train'
          in capsys.readouterr().err)
  assert not (workdir / 'config.json').exists()  # it saved nothing: the step's record stands
  assert run_config.load(str(workdir)).model.meki.d_mem == 8

  for step in (2, 4):  # nothing intact at all: an error, not a silent fresh start
    _flip(_largest_file(os.path.join(directory, str(step), 'state')), 100)
  with pytest.raises(RunError, match=r'no checkpoint in .* passes verification: step 4: .*; '
                                     r'step 2: .*Nothing was changed'):
    train(small_config(6, checkpoint_every=2), str(workdir))
  assert checkpoint.saved_steps(directory) == [2, 4]


@pytest.mark.slow
def test_the_run_record_changes_only_with_a_saved_checkpoint(tmp_path, capsys):
  """Issue 21 rows 3 and 7: a resume that diverges before it saves, or has nothing to train,
  leaves config.json as it was; init_from_hf on a resume is ignored, said and not recorded;
  without config.json the step's record refuses a same-shape model change; changes of data,
  batch and sequence length are allowed and printed."""
  workdir = tmp_path / 'run'
  train(small_config(2, checkpoint_every=2), str(workdir))
  record = (workdir / 'config.json').read_text()
  assert record == (workdir / 'checkpoints' / '2' / 'config.json').read_text()
  assert checkpoint.verify_step(str(workdir / 'checkpoints'), 2) is None  # covered by checksums

  diverging = small_config(4, checkpoint_every=2)
  diverging.optim.peak_lr = 1e30
  with pytest.raises(RunError, match='the loss .* is not finite; training stopped without saving'):
    train(diverging, str(workdir))
  finished = small_config(2, checkpoint_every=2)
  finished.optim.peak_lr = 0.5
  capsys.readouterr()
  assert train(finished, str(workdir)) == {}
  assert capsys.readouterr().err.splitlines() == [
      'resuming checkpoint step 2 with changed settings: optim.peak_lr: 0.01 at the checkpoint, '
      '0.5 now',
      f'{workdir}: checkpoint step 2 already reaches train.num_steps=2; nothing to train (raise '
      '--config.train.num_steps to continue)']
  assert (workdir / 'config.json').read_text() == record

  os.remove(workdir / 'config.json')
  other = small_config(4, checkpoint_every=2)
  other.model.meki.fusion = 'mul_silu'  # the same parameter shapes, another function
  with pytest.raises(ValueError, match="model.meki.fusion: 'add_sigmoid' there, 'mul_silu' now"):
    train(other, str(workdir))
  resumed = small_config(3, checkpoint_every=3)
  resumed.data.seq_len, resumed.train.global_batch_size = 32, 16
  resumed.train.init_from_hf = '/nonexistent'
  train(resumed, str(workdir))
  err = capsys.readouterr().err
  assert ('resuming checkpoint step 2 with changed settings: data.seq_len: 64 at the checkpoint, '
          '32 now; train.checkpoint_every: 2 at the checkpoint, 3 now; train.global_batch_size: '
          '8 at the checkpoint, 16 now; train.num_steps: 2 at the checkpoint, 3 now') in err
  assert (f"train.init_from_hf='/nonexistent' is ignored: the run resumes from checkpoint step 2 "
          f'of {workdir} (it only initialises a new run)') in err
  recorded = run_config.load(str(workdir))
  assert (recorded.data.seq_len, recorded.train.init_from_hf) == (32, '')


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


def test_evaluation_sources_without_documents_are_named_before_step_1(tmp_path):
  from meki_jax.data import preprocess
  (tmp_path / 'empty.jsonl').write_text('')
  preprocess.preprocess([str(tmp_path / 'empty.jsonl')], str(tmp_path / 'shards'),
                        progress=False)
  config = small_config(2)
  config.data.eval_sources = (dict(path=str(tmp_path / 'shards' / '*.array_record')),)
  with pytest.raises(ValueError, match=r"the evaluation data has no loss tokens: "
                                       r"data.eval_sources \('.*shards/\*.array_record'\) hold no "
                                       r'document of two or more tokens'):
    train(config, str(tmp_path / 'run'))
  assert not (tmp_path / 'run' / 'config.json').exists()


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


def _jax_loaded(process):
  with open(f'/proc/{process.pid}/maps', encoding='utf-8') as maps:
    return 'jaxlib' in maps.read()


def _files(directory):
  return {os.path.relpath(os.path.join(top, name), directory):
          open(os.path.join(top, name), 'rb').read()
          for top, _, names in os.walk(directory) for name in names}


@pytest.mark.slow
def test_ctrl_c_during_start_up_exits_at_once_with_one_line(tmp_path):
  """Issue 21 row 2: while jax is imported, while the run is set up (data, mesh, model) and
  while a checkpoint is restored, Ctrl-C prints one line and exits 130; the workdir is as it
  was (no lock, no new step, config.json unchanged)."""
  workdir = tmp_path / 'run'
  train(small_config(2, checkpoint_every=2), str(workdir))
  before = _files(workdir)
  for moment in ('importing jax', 'setting up', 'restoring'):
    process = _start('  return small_config(4, checkpoint_every=2)\n', workdir)
    deadline, seen = time.time() + 300, ''
    while not _jax_loaded(process):
      assert process.poll() is None and time.time() < deadline, process.stdout.read()
      time.sleep(0.05)
    if moment == 'setting up':
      time.sleep(1.5)
    while moment == 'restoring' and 'resuming checkpoint step 2 with changed settings' not in seen:
      seen += process.stdout.readline()  # printed before the restore
      assert process.poll() is None, seen
    sent = time.time()
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    lines = [line for line in (seen + output).splitlines() if line.strip()]
    assert process.returncode == 130, (moment, lines)
    assert lines[-1] == 'python -m meki_jax.train: interrupted (Ctrl-C)', (moment, lines)
    assert not any('Traceback' in line or 'Fatal' in line for line in lines), (moment, lines)
    assert time.time() - sent < 20, moment  # at once: ~0.05 s on an idle machine
    assert _files(workdir) == before, moment


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
