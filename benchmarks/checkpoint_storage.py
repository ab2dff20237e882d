"""Checkpoint save and restore of the quick-start state: a local Cloud Storage server against the
local disk, in one run.

  python benchmarks/checkpoint_storage.py [--config configs/quickstart.py] [--repeats 3]
      [--dir /tmp]

Creates the config's training state (parameters, both Adam moments, step; the quick start's
holds 33.9M parameters, 407 MB in fp32 with its moments) on one CPU device and, for each storage
in turn, saves it with the trainer's checkpoint.Manager (orbax's asynchronous save, the
checksum manifest, the commit: checkpoint.save + checkpoint.finish) and restores it
(checkpoint.restore: the manifest verified, then orbax's restore into the same shardings),
`--repeats` times, a new step each time. The server is fake-gcs-server on 127.0.0.1
(meki_jax.gcs_emulator, objects in memory), so the ratio measures the object-store path (HTTP,
gcsfs, tensorstore's gcs driver, orbax's commit object instead of a rename) on this machine, not
Cloud Storage's own bandwidth or latency. Prints each time and the medians' ratio gs:// / local.
"""

import argparse
import os
import statistics
import tempfile
import time
import uuid


def _load_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def _time_storage(workdir, config, repeats):
  """[(save seconds, restore seconds)] of `repeats` save/restore pairs into `workdir`."""
  import jax
  from meki_jax import sharding
  from meki_jax.model.transformer import build_model
  from meki_jax.train import checkpoint, optim, state as state_lib
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  rules = sharding.axis_rules(config.mesh)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0))
  jax.block_until_ready(state)
  config.train.keep_checkpoints = repeats
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  times = []
  try:
    for step in range(1, repeats + 1):
      start = time.perf_counter()
      checkpoint.save(manager, step, state.replace(step=step), None, force=True)
      checkpoint.finish(manager)
      saved = time.perf_counter()
      restored, _ = checkpoint.restore(manager, abstract, shardings, None, step=step)
      jax.block_until_ready(restored)
      times.append((saved - start, time.perf_counter() - saved))
  finally:
    manager.close()
  return times, sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(state))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dir', default=tempfile.gettempdir(), help='where the local run goes')
  args = parser.parse_args()
  from meki_jax import files
  from meki_jax.gcs_emulator import Emulator
  config = _load_config(args.config)
  results = {}
  with tempfile.TemporaryDirectory(dir=args.dir) as local, Emulator() as emulator:
    os.environ['STORAGE_EMULATOR_HOST'] = emulator.url
    files._use_emulator()  # noqa: SLF001  (what importing files does with the variable set)
    bucket = emulator.create_bucket(f'bench-{uuid.uuid4().hex[:8]}')
    for name, workdir in (('local disk', local), ('gs:// (emulator)', f'{bucket}/run')):
      times, state_bytes = _time_storage(workdir, config, args.repeats)
      results[name] = times
      for save, restore in times:
        print(f'{name:18s} save {save:6.2f} s  restore {restore:6.2f} s  '
              f'({state_bytes / 1e6:.0f} MB state)', flush=True)
  (local_save, local_restore), (gcs_save, gcs_restore) = (
      [statistics.median(column) for column in zip(*times)] for times in results.values())
  print(f'median save: local {local_save:.2f} s, gs:// {gcs_save:.2f} s, '
        f'ratio {gcs_save / local_save:.2f}x')
  print(f'median restore: local {local_restore:.2f} s, gs:// {gcs_restore:.2f} s, '
        f'ratio {gcs_restore / local_restore:.2f}x')


if __name__ == '__main__':
  main()
