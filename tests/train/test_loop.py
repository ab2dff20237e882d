"""The training loop end to end on the embedded corpus: learning, exact resume, preemption."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import base
from meki_jax import run_config
from meki_jax.train.loop import train
from meki_jax.train.metrics import read_metrics


def small_config(num_steps, **train_overrides):
  """A 2-layer MeKi model with the real Qwen3 vocabulary on the embedded stdlib corpus,
  sharded over all (8 virtual) devices."""
  config = base.get_config()
  config.model = base.model_config(num_layers=2, d_model=32, num_heads=2, num_kv_heads=1,
                                   d_ff=64, d_mem=8)
  config.model.update(head_dim=16, dtype='float32', remat_policy='none')
  config.data.seq_len = 64
  config.train.update({**dict(num_steps=num_steps, global_batch_size=8, log_every=1,
                             eval_every=1000, eval_batches=2, checkpoint_every=1000),
                       **train_overrides})
  config.optim.update(peak_lr=1e-2, end_lr=1e-3, warmup_steps=2)
  return config


def test_training_lowers_the_loss(tmp_path):
  train(small_config(30, log_every=5), str(tmp_path))
  losses = [r['loss'] for r in read_metrics(tmp_path) if 'loss' in r]
  assert losses[-1] < losses[0] - 1.0, losses  # from ~11.9 (uniform over 151,680 ids)
  assert os.path.isdir(tmp_path / 'tensorboard')
  assert run_config.load(str(tmp_path)).model.to_dict() == small_config(30).model.to_dict()


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses_exactly(tmp_path):
  uninterrupted = small_config(6, checkpoint_every=3)
  train(uninterrupted, str(tmp_path / 'whole'))

  first_half = small_config(3, checkpoint_every=3)
  first_half.optim.schedule_steps = 6  # the same learning-rate schedule, stopped at step 3
  train(first_half, str(tmp_path / 'resumed'))
  train(uninterrupted, str(tmp_path / 'resumed'))  # restores step 3 and its data position

  losses = lambda run: {r['step']: r['loss'] for r in read_metrics(tmp_path / run) if 'loss' in r}
  whole, resumed = losses('whole'), losses('resumed')
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  for step in (4, 5, 6):
    assert resumed[step] == whole[step], (step, resumed[step], whole[step])


@pytest.mark.slow
def test_a_run_with_its_state_in_host_memory_trains_and_resumes_like_one_in_hbm(tmp_path):
  """Parameters and Adam moments in host memory, each layer's input too: the same losses as
  in HBM, and its checkpoint resumes in HBM (memory placement may change on resume)."""
  train(small_config(4, checkpoint_every=2), str(tmp_path / 'hbm'))
  on_host = small_config(2, checkpoint_every=2)
  on_host.optim.update(schedule_steps=4, params_on_host=True, opt_state_on_host=True)
  on_host.model.update(remat_policy='full', remat_offload=('layer_input',))
  train(on_host, str(tmp_path / 'mixed'))
  train(small_config(4, checkpoint_every=2), str(tmp_path / 'mixed'))

  losses = lambda run: {r['step']: r['loss'] for r in read_metrics(tmp_path / run) if 'loss' in r}
  assert losses('mixed') == losses('hbm'), (losses('mixed'), losses('hbm'))


@pytest.mark.slow
def test_sigterm_saves_a_restorable_checkpoint_and_exits_cleanly(tmp_path):
  config_file = tmp_path / 'config.py'
  config_file.write_text(
      'from tests.train.test_loop import small_config\n'
      'def get_config():\n  return small_config(100_000, checkpoint_every=100_000)\n')
  workdir = tmp_path / 'run'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  process = subprocess.Popen(
      [sys.executable, '-m', 'meki_jax.train', f'--config={config_file}', f'--workdir={workdir}'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / 'metrics.jsonl').exists() or len(read_metrics(workdir)) < 3:
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, 'training did not log 3 steps within 300 s'
    time.sleep(0.5)
  process.send_signal(signal.SIGTERM)
  output, _ = process.communicate(timeout=300)
  assert process.returncode == 0, output
  saved = sorted(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())
  assert saved and 3 <= saved[-1] < 100_000, (saved, output)

  resumed = small_config(saved[-1] + 1, checkpoint_every=100_000)
  resumed.optim.schedule_steps = 100_000
  train(resumed, str(workdir))
  steps = [r['step'] for r in read_metrics(workdir) if 'loss' in r]
  assert steps[-1] == saved[-1] + 1


@pytest.mark.slow
def test_resume_after_kill_9_reproduces_the_losses_and_skips_a_half_written_checkpoint(tmp_path):
  train(small_config(6, checkpoint_every=3), str(tmp_path / 'whole'))

  config_file = tmp_path / 'config.py'
  config_file.write_text(
      'from tests.train.test_loop import small_config\n'
      'def get_config():\n'
      '  config = small_config(100_000, checkpoint_every=3)\n'
      '  config.optim.schedule_steps = 6\n'
      '  return config\n')
  workdir = tmp_path / 'killed'
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=os.getcwd())
  process = subprocess.Popen(
      [sys.executable, '-m', 'meki_jax.train', f'--config={config_file}', f'--workdir={workdir}'],
      env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 300
  while not (workdir / 'checkpoints' / '3').is_dir() or len(read_metrics(workdir)) < 5:
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, 'no step-3 checkpoint and 5 logged steps within 300 s'
    time.sleep(0.2)
  process.kill()  # SIGKILL: no handler runs, whatever was being written stays half-written
  process.communicate(timeout=60)
  for step_dir in (workdir / 'checkpoints').iterdir():
    if step_dir.name.isdigit() and int(step_dir.name) > 3:
      shutil.rmtree(step_dir)  # keep the test about step 3 whatever the kill interrupted
  partial = workdir / 'checkpoints' / '9.orbax-checkpoint-tmp-1234' / 'state'
  partial.mkdir(parents=True)
  (partial / 'garbage').write_bytes(b'\x00' * 100)  # what a save interrupted mid-write leaves

  train(small_config(6, checkpoint_every=3), str(workdir))
  losses = lambda run: {r['step']: r['loss'] for r in read_metrics(run) if 'loss' in r}
  whole, resumed = losses(tmp_path / 'whole'), losses(workdir)  # the last record per step wins
  for step in (4, 5, 6):
    assert resumed[step] == whole[step], (step, resumed[step], whole[step])
