"""Ahead-of-time compilation for TPU topologies (libtpu, no TPU attached)."""

import importlib.util
import os
import subprocess
import sys

import pytest

from meki_jax.train.aot import compile_train_step, parse_topology
from tests.train.test_loop import small_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize('name, jax_name, chips', [
    ('v5p-8', 'v5:2x2x1', 4), ('v5p-16', 'v5:2x2x2', 8), ('v5p-64', 'v5:2x4x4', 32),
    ('v5p-128', 'v5:4x4x4', 64), ('v4-32', 'v4:2x2x4', 16), ('v5e-16', 'v5e:4x4', 16),
    ('v6e-8', 'v6e:2x4', 8), ('v6e-256', 'v6e:16x16', 256)])
def test_accelerator_types_map_to_chip_grids(name, jax_name, chips):
  topology = parse_topology(name)
  assert (topology.jax_name, topology.chips) == (jax_name, chips)


@pytest.mark.parametrize('name', ['v5p', 'v5p-x', 'v3-8', 'v5p-24', 'v5p-2'])
def test_unknown_topologies_are_rejected(name):
  with pytest.raises(ValueError, match='--topology'):
    parse_topology(name)


@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (.[tpu])')
def test_train_step_compiles_for_a_v5p_slice():
  config = small_config(num_steps=10, grad_accum_steps=2)
  result = compile_train_step(config, parse_topology('v5p-8'))
  assert result['chips'] == 4 and result['fits']
  assert 0 < result['argument_gib'] <= result['total_gib'] < 1
  assert result['model_tflops_per_step'] > 0


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (.[tpu])')
def test_auto_attention_compiles_the_splash_kernel_with_a_chunked_loss_for_tpu():
  config = small_config(num_steps=10)
  config.data.seq_len = 256
  config.model.update(head_dim=128, remat_policy='mlp', attention_block=128, loss_chunk_len=64)
  result = compile_train_step(config, parse_topology('v5p-8'))
  assert result['attention'] == 'splash' and result['fits']


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (.[tpu])')
def test_offloaded_activations_and_state_move_from_hbm_to_host_memory():
  """Each layer's input in host memory under 'full'; then parameters and Adam moments there
  too: the arguments left in HBM are the batch and the step counter."""
  config = small_config(num_steps=10)
  config.model.update(d_model=256, remat_policy='full', remat_offload=('layer_input',))
  config.data.seq_len = 512
  activations = compile_train_step(config, parse_topology('v5p-8'))
  rows_per_chip = config.train.global_batch_size // activations['chips']
  layer_inputs = config.model.num_layers * rows_per_chip * config.data.seq_len * 256 * 4  # fp32
  assert activations['host_temporary_gib'] * 2**30 >= layer_inputs
  assert activations['host_argument_gib'] == 0

  config.optim.update(params_on_host=True, opt_state_on_host=True)
  state = compile_train_step(config, parse_topology('v5p-8'))
  assert state['fits'] and state['state_on_host'] == ('params', 'opt_state')
  batch_and_step = (5 * rows_per_chip * config.data.seq_len * 4 + 512) / 2**30
  assert state['argument_gib'] <= batch_and_step
  assert state['host_argument_gib'] == pytest.approx(
      activations['argument_gib'] - state['argument_gib'])


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec('libtpu') is None, reason='needs libtpu (.[tpu])')
def test_aot_compile_runs_beside_another_process_holding_libtpu(tmp_path):
  """Another process that loaded libtpu (without ALLOW_MULTIPLE_LIBTPU_LOAD) keeps running
  while tools/aot_compile.py compiles; before, libtpu's lockfile aborted the compile."""
  holder_code = ('import os, time\n'  # loads libtpu as any JAX program would, no opt-out
                 'os.environ["TPU_SKIP_MDS_QUERY"] = "1"\n'
                 'from jax.experimental import topologies\n'
                 'topologies.get_topology_desc(platform="tpu", topology_name="v5:2x2x1", '
                 'chip_config_name="megacore", chips_per_host_bounds=(2, 2, 1), num_slices=1)\n'
                 'print("holding", flush=True)\n'
                 'time.sleep(600)\n')
  env = {key: value for key, value in os.environ.items()
         if key not in ('ALLOW_MULTIPLE_LIBTPU_LOAD', 'XLA_FLAGS')}
  env['JAX_PLATFORMS'] = 'cpu'
  holder = subprocess.Popen([sys.executable, '-c', holder_code], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
  try:
    assert holder.stdout.readline().strip() == 'holding'
    args = ['tools/aot_compile.py', '--config', 'configs/quickstart.py', '--topology', 'v5p-8',
            '--config.train.global_batch_size=8']
    run = subprocess.run([sys.executable, *args], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'attention xla' in run.stdout and 'fits' in run.stdout, run.stdout  # head_dim 24
    assert holder.poll() is None  # the holder is still alive: both loaded libtpu
  finally:
    holder.kill()
    holder.wait()
