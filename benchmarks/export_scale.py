"""Exporting full-size checkpoints: peak RSS and wall time, streaming against in-memory.

  python benchmarks/export_scale.py --configs=configs/meki_1p7b.py,configs/meki_4b.py \
      [--devices=8] [--dir=/tmp] [--old_limit_gb=16] [--num_layers=0]

For each config, in one run:
1. writes a training checkpoint of the real shape in the real on-disk layout: the trainer's own
   `checkpoint.save` writes the TrainState (params and AdamW moments) of the same model tree on a
   `--devices` mesh at small size, then every array is rewritten at full size with tensorstore
   into the same OCDBT store, zarr with the same codec, chunks = the mesh's shards, and orbax's
   metadata and the step's checksum manifest get the full shapes and files. Parameters are
   random (N(0, init_std); norm scales, alpha and beta 1), moments zero (a fresh optimizer).
   Written chunk by chunk, never whole;
2. exports it with the streaming path (`exporter.export_checkpoint`, what tools/export_memory.py
   runs) in a subprocess;
3. exports it with the in-memory path (orbax `restore_params` of every parameter, then
   `export_folded`) in a subprocess watched every 0.2 s and killed above `--old_limit_gb` of RSS,
   or not started when the parameters alone (fp32) exceed that limit;
4. checks that both exports hold the same files (checksums) when both finished, and deletes the
   checkpoint and exports.
Peak RSS is each subprocess' own (wait4's ru_maxrss). `--num_layers` cuts the depth for a quick
check of the benchmark itself.
"""

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import psutil

ROOT = pathlib.Path(__file__).resolve().parent.parent
GIB = 1 << 30


def load_config(path, num_layers):
  sys.path.insert(0, str(ROOT))
  import importlib.util
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  if num_layers:
    config.model.num_layers = num_layers
  return config


# ---- 1. the checkpoint (runs in a subprocess with `devices` virtual CPU devices) ----

def write_checkpoint(config, workdir, devices, seed=0):
  """Writes <workdir>/checkpoints/0 (see the module docstring); returns its size in bytes."""
  import jax
  import numpy as np
  import tensorstore as ts
  from meki_jax import sharding
  from meki_jax.model.transformer import build_model
  from meki_jax.train import checkpoint, checksums, optim, state as state_lib

  mesh = sharding.make_mesh(config.mesh, jax.devices()[:devices])
  rules = sharding.axis_rules(config.mesh)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  full_config = config.model
  small = full_config.copy_and_resolve_references()
  small.update(vocab_size=256, d_model=8 * devices, d_ff=16 * devices, num_heads=devices,
               num_kv_heads=devices, head_dim=16)
  small.meki.d_mem = 16
  state = state_lib.create_state(build_model(small), optimizer, mesh, rules,
                                 jax.random.PRNGKey(seed))
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  checkpoint.save(manager, 0, state, None, force=True)
  manager.wait_until_finished()
  manager.close()
  del state

  abstract, shardings = state_lib.state_shardings(build_model(full_config), optimizer, mesh, rules)
  leaves = {}
  for (path, leaf), (_, leaf_sharding) in zip(
      jax.tree_util.tree_flatten_with_path(abstract)[0],
      jax.tree_util.tree_flatten_with_path(shardings)[0]):
    keys = tuple(str(getattr(key, 'key', getattr(key, 'name', getattr(key, 'idx', key))))
                 for key in path)
    leaves[keys] = (leaf.shape, leaf.dtype, leaf_sharding.shard_shape(leaf.shape))
  state_dir = pathlib.Path(workdir) / 'checkpoints' / '0' / 'state'
  metadata = json.loads((state_dir / '_METADATA').read_text())
  rng = np.random.default_rng(seed)
  for entry in metadata['tree_metadata'].values():
    keys = tuple(item['key'] for item in entry['key_metadata'])
    if keys not in leaves:  # an empty optimizer state: no array
      continue
    shape, dtype, chunk = leaves[keys]
    entry['value_metadata']['write_shape'] = list(chunk)
    name = '.'.join(keys)
    store = ts.open({
        'driver': 'zarr',
        'kvstore': {'driver': 'ocdbt', 'base': f'file://{state_dir}', 'path': f'{name}/'},
        'metadata': {'shape': list(shape), 'chunks': list(chunk), 'dtype': np.dtype(dtype).str,
                     'compressor': {'id': 'zstd', 'level': 1}, 'fill_value': None,
                     'dimension_separator': '.'}},
        create=True, delete_existing=True).result()
    trained = keys[0] == 'params' and keys[-1] in ('kernel', 'embedding', 'memory_table')
    ones = keys[0] == 'params' and not trained
    grid = [range(0, size, step) for size, step in zip(shape, chunk)] or [[]]
    pending = []  # two chunk writes in flight, so OCDBT commits overlap the generation
    for corner in _product(grid):
      index = tuple(slice(start, start + step) for start, step in zip(corner, chunk))
      block_shape = tuple(min(step, size - start) for start, step, size in
                          zip(corner, chunk, shape))
      if trained:
        block = rng.standard_normal(block_shape, np.float32) * np.float32(full_config.init_std)
      else:
        block = np.full(block_shape, 1 if ones else 0, dtype)
      pending.append(store[index].write(block))
      del block
      if len(pending) >= 2:
        pending.pop(0).result()
    for write in pending:
      write.result()
  (state_dir / '_METADATA').write_text(json.dumps(metadata))
  array_metadatas = state_dir / 'array_metadatas'
  for process_file in array_metadatas.iterdir():
    records = json.loads(process_file.read_text())
    for record in records['array_metadatas']:
      array = record['array_metadata']
      keys = tuple(array['param_name'].split('.'))
      chunk = list(leaves[keys][2])
      array['write_shape'] = array['chunk_shape'] = chunk
    process_file.write_text(json.dumps(records))
  # The step's checksum manifest (written by the save) is rewritten for the full-size files, as
  # the trainer writes it after the save: the export verifies it before reading anything.
  checksums.write_manifest(str(state_dir.parent))
  return sum(f.stat().st_size for f in state_dir.rglob('*') if f.is_file())


def _product(ranges):
  if not ranges:
    yield ()
    return
  for first in ranges[0]:
    for rest in _product(ranges[1:]):
      yield (first,) + rest


# ---- 2./3. the exports (each in its own subprocess) ----

def export(config, workdir, out, path):
  from meki_jax.export import exporter
  if path == 'streaming':
    exporter.export_checkpoint(workdir, config.model, out)
  else:
    params, step = exporter.restore_params(config, workdir)
    exporter.export_folded(params, config.model, out, source={'checkpoint': str(
        exporter.checkpoint_step_dir(workdir)), 'step': step})


def run_worker(args, limit_bytes=None):
  """Runs this file as a worker; returns (peak RSS bytes, seconds, outcome)."""
  command = [sys.executable, __file__] + args
  env = {**os.environ, 'PYTHONPATH': str(ROOT), 'JAX_PLATFORMS': 'cpu'}
  start = time.perf_counter()
  process = subprocess.Popen(command, env=env, cwd=ROOT)
  killed = []
  if limit_bytes:
    def watch():
      watched = psutil.Process(process.pid)
      while process.poll() is None:
        try:
          rss = watched.memory_info().rss
        except psutil.NoSuchProcess:
          return
        if rss > limit_bytes:
          killed.append(rss)
          process.kill()
          return
        time.sleep(0.2)
    threading.Thread(target=watch, daemon=True).start()
  _, status, usage = os.wait4(process.pid, 0)
  process.returncode = os.waitstatus_to_exitcode(status)
  seconds = time.perf_counter() - start
  peak = usage.ru_maxrss * 1024
  if killed:
    return peak, seconds, f'killed at {killed[0] / GIB:.1f} GiB RSS (limit {limit_bytes / GIB:.0f})'
  if process.returncode:
    return peak, seconds, f'failed (exit {process.returncode})'
  return peak, seconds, 'done'


def param_bytes(config):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from meki_jax.model.transformer import build_model
  model = build_model(config.model)
  abstract = jax.eval_shape(lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))['params'],
                            jax.random.PRNGKey(0))
  return sum(int(np.prod(leaf.shape)) * 4 for leaf in jax.tree_util.tree_leaves(abstract))


def same_exports(first, second):
  """Whether two export directories hold the same files (manifest entries and file bytes)."""
  from meki_jax.export import memory_store
  a, b = (json.loads((d / memory_store.MANIFEST).read_text()) for d in (first, second))
  return a['memory'] == b['memory'] and a['backbone'] == b['backbone']


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--configs', default='configs/meki_1p7b.py,configs/meki_4b.py')
  parser.add_argument('--devices', type=int, default=8, help='mesh the checkpoint is written on')
  parser.add_argument('--dir', default=tempfile.gettempdir())
  parser.add_argument('--old_limit_gb', type=float, default=16.0)
  parser.add_argument('--num_layers', type=int, default=0, help='0: the config\'s')
  parser.add_argument('--worker', choices=('checkpoint', 'streaming', 'in_memory'))
  parser.add_argument('--config')
  parser.add_argument('--workdir')
  parser.add_argument('--out')
  args = parser.parse_args()

  if args.worker:
    config = load_config(args.config, args.num_layers)
    if args.worker == 'checkpoint':
      print(f'checkpoint: {write_checkpoint(config, args.workdir, args.devices) / GIB:.2f} GiB '
            'on disk', flush=True)
    else:
      export(config, args.workdir, args.out, args.worker)
    return

  rows = []
  for config_path in args.configs.split(','):
    config = load_config(config_path, args.num_layers)
    name = pathlib.Path(config_path).stem + (f' ({args.num_layers} layers)'
                                             if args.num_layers else '')
    base = pathlib.Path(tempfile.mkdtemp(prefix='export_scale_', dir=args.dir))
    common = ['--config', config_path, '--num_layers', str(args.num_layers),
              '--workdir', str(base / 'run')]
    try:
      os.environ['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={args.devices}'
      peak, seconds, outcome = run_worker(['--worker', 'checkpoint', '--devices',
                                           str(args.devices)] + common)
      os.environ.pop('XLA_FLAGS')
      print(f'{name}: wrote the checkpoint in {seconds:.0f} s, peak RSS {peak / GIB:.2f} GiB '
            f'({outcome})', flush=True)
      if outcome != 'done':
        raise RuntimeError(f'writing the checkpoint {outcome}')
      results = {}
      results['streaming'] = run_worker(['--worker', 'streaming', '--out',
                                         str(base / 'streaming')] + common)
      needed = param_bytes(config)
      limit = int(args.old_limit_gb * GIB)
      if needed > limit:
        results['in_memory'] = (None, None, f'not run: its parameters alone take '
                                f'{needed / GIB:.1f} GiB in fp32, above the '
                                f'{args.old_limit_gb:.0f} GiB limit')
      else:
        results['in_memory'] = run_worker(['--worker', 'in_memory', '--out',
                                           str(base / 'in_memory')] + common, limit)
      identical = (same_exports(base / 'streaming', base / 'in_memory')
                   if all(r[2] == 'done' for r in results.values()) else None)
      rows.append((name, needed, results, identical))
      for path, (peak, seconds, outcome) in results.items():
        print(f'{name} {path}: ' + (f'peak RSS {peak / GIB:.2f} GiB, {seconds:.0f} s, '
                                    if peak else '') + outcome, flush=True)
    finally:
      shutil.rmtree(base, ignore_errors=True)

  print('\n| checkpoint | params (fp32) | path | peak RSS | wall time | outcome |')
  print('|---|---|---|---|---|---|')
  for name, needed, results, identical in rows:
    old_peak, old_seconds, _ = results['in_memory']
    for path, (peak, seconds, outcome) in results.items():
      ratio = (f' ({peak / old_peak:.2f}x RSS, {seconds / old_seconds:.2f}x time of in-memory)'
               if path == 'streaming' and old_peak and results['in_memory'][2] == 'done' else '')
      print(f'| {name} | {needed / GIB:.1f} GiB | {path} | '
            + (f'{peak / GIB:.2f} GiB | {seconds:.0f} s | ' if peak else '- | - | ')
            + outcome + ratio + ' |')
    if identical is not None:
      print(f'| {name} | | both | | | identical files (checksums): {identical} |')


if __name__ == '__main__':
  main()
