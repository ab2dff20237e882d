"""2 processes x 4 virtual CPU devices train on one 8-device mesh; 1 process x 8 devices resumes."""

import os
import pathlib
import shutil
import subprocess

import jax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding

from meki_jax import sharding
from meki_jax.model.transformer import build_model
from meki_jax.train import checkpoint, loop, optim, state as state_lib, step as step_lib
from meki_jax.train.metrics import read_metrics
from tests.train.test_loop import small_config

REPO = pathlib.Path(__file__).resolve().parents[2]


def _eval_loss_of_checkpoint(config, workdir, step):
  """Restores `step` into this process' 8-device mesh and evaluates it."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, rules)
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  state, data_restored = checkpoint.restore(manager, abstract, shardings, None, step=step)
  manager.close()
  batch_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length'), rules))
  eval_fn = jax.jit(lambda params, batch: step_lib.eval_step(params, batch, model=model))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    return loop.evaluate(state.params, config, eval_fn, batch_sharding), state


@pytest.mark.slow
def test_two_processes_train_and_one_process_resumes(tmp_path):
  config_file = tmp_path / 'config.py'
  config_file.write_text(
      'from tests.train.test_loop import small_config\n'
      'def get_config():\n'
      '  return small_config(4, checkpoint_every=2, eval_every=2, log_every=1)\n')
  workdir = tmp_path / 'multi'
  env = dict(os.environ, PYTHONPATH=str(REPO), MEKI_LOG_DIR=str(tmp_path / 'logs'))
  env.pop('XLA_FLAGS', None)
  result = subprocess.run(
      [str(REPO / 'launch' / 'local_multiprocess.sh'), '2', '4', '--', f'--config={config_file}',
       f'--workdir={workdir}'], env=env, cwd=REPO, timeout=600, capture_output=True, text=True)
  logs = {name: (tmp_path / 'logs' / name).read_text()
          for name in os.listdir(tmp_path / 'logs')}
  assert result.returncode == 0, logs
  metrics = read_metrics(workdir)
  multi_eval = {r['step']: r['eval_loss'] for r in metrics if 'eval_loss' in r}
  assert sorted(multi_eval) == [2, 4]
  print('2-process run:', [(r['step'], round(r.get('loss', r.get('eval_loss')), 4))
                           for r in metrics])

  config = small_config(4, checkpoint_every=2, eval_every=2, log_every=1)
  resumed = tmp_path / 'single'
  shutil.copytree(workdir / 'checkpoints' / '2', resumed / 'checkpoints' / '2')
  eval_loss, state = _eval_loss_of_checkpoint(config, resumed, step=2)
  assert int(state.step) == 2
  assert eval_loss == pytest.approx(multi_eval[2], abs=1e-5)  # same params, resharded 2x4 -> 8

  loop.train(config, str(resumed))  # continues from step 2 in one process
  records = read_metrics(resumed)
  single_losses = {r['step']: r['loss'] for r in records if 'loss' in r}
  single_eval = {r['step']: r['eval_loss'] for r in records if 'eval_loss' in r}
  assert sorted(single_losses) == [3, 4]
  # Steps 3-4 see other batches (the data stream restarts under a new process count), so the
  # eval loss after them is close to, not equal to, the 2-process run's.
  assert single_eval[4] == pytest.approx(multi_eval[4], abs=0.05)
  print('1-process continuation:', single_losses, 'eval at 4:', single_eval[4],
        'vs 2-process', multi_eval[4])
