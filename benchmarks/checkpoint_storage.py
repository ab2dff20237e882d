"""Checkpoint save and restore of the quick-start state: a local Cloud Storage server against the
local disk, in one run.

  python benchmarks/checkpoint_storage.py [--config configs/quickstart.py] [--repeats 3]
      [--dir /tmp]

Creates the config's training state (parameters, both Adam moments, step; the quick start's
holds 33.9M parameters) on one CPU device and saves it with the trainer's checkpoint.Manager
(orbax's asynchronous save, the checksum manifest, the commit: checkpoint.save +
checkpoint.finish) and restores it (checkpoint.restore: the manifest verified, then orbax's
restore into the same shardings), `--repeats` times, a new step each time, on the local disk and
on the server in turn (interleaved, so both see the same machine load). The server is
fake-gcs-server on 127.0.0.1 (meki_jax.gcs_emulator, objects in memory), so the ratio measures
the object-store path (HTTP, gcsfs, tensorstore's gcs driver, orbax's commit object instead of a
rename) on this machine, not Cloud Storage's own bandwidth or latency. Prints each time and the
medians' ratio gs:// / local.
"""

import argparse
import os
import statistics
import tempfile
import time
import uuid

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # a CPU benchmark: libtpu, if installed, stays idle


def _load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _state(config):
  """(state, abstract state, shardings) of `config` on one CPU device."""
  import jax
  from meki_jax import sharding
  from meki_jax.model.transformer import build_model
  from meki_jax.train import optim, state as state_lib
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.axis_rules(config.mesh)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0))
  return jax.block_until_ready(state), abstract, shardings


def _save_and_restore(manager, step, state, abstract, shardings):
  """(save seconds, restore seconds) of one checkpoint step through the trainer's functions."""
  import jax
  from meki_jax.train import checkpoint
  start = time.perf_counter()
  checkpoint.save(manager, step, state.replace(step=step), None, force=True)
  checkpoint.finish(manager)
  saved = time.perf_counter()
  restored, _ = checkpoint.restore(manager, abstract, shardings, None, step=step)
  jax.block_until_ready(restored)
  return saved - start, time.perf_counter() - saved


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=tempfile.gettempdir(), help='where the local run goes')
  args = parser.parse_args()
  import jax
  from meki_jax import files
  from meki_jax.gcs_emulator import Emulator
  from meki_jax.train import checkpoint
  config = _load_config(args.config)
  config.train.keep_checkpoints = args.repeats
  state, abstract, shardings = _state(config)
  state_bytes = sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))
  print(f'{args.config}: {state_bytes / 1e6:.0f} MB of state', flush=True)
  with tempfile.TemporaryDirectory(dir=args.dir) as local, Emulator() as emulator:
    os.environ['STORAGE_EMULATOR_HOST'] = emulator.url
    files._use_emulator()  # noqa: SLF001  (what importing files does with the variable set)
    bucket = emulator.create_bucket(f'bench-{uuid.uuid4().hex[:8]}')
    workdirs = {'local disk': local, 'gs:// (emulator)': f'{bucket}/run'}
    managers = {name: checkpoint.checkpoint_manager(workdir, config.train)
                for name, workdir in workdirs.items()}
    results = {name: [] for name in workdirs}
    try:
      for step in range(1, args.repeats + 1):  # interleaved: both see the same machine load
        for name, manager in managers.items():
          save, restore = _save_and_restore(manager, step, state, abstract, shardings)
          results[name].append((save, restore))
          print(f'{name:18s} step {step}  save {save:6.2f} s  restore {restore:6.2f} s',
                flush=True)
    finally:
      for manager in managers.values():
        manager.close()
  (local_save, local_restore), (gcs_save, gcs_restore) = (
      [statistics.median(column) for column in zip(*times)] for times in results.values())
  print(f'median save: local {local_save:.2f} s, gs:// {gcs_save:.2f} s, '
        f'ratio {gcs_save / local_save:.2f}x')
  print(f'median restore: local {local_restore:.2f} s, gs:// {gcs_restore:.2f} s, '
        f'ratio {gcs_restore / local_restore:.2f}x')


if __name__ == '__main__':
  main()
