"""Smallest v5p slice and fewest accumulation steps that train each paper model at the recipe's
global batch (256 x 4096), and the recipe-shape table at one topology.

  pip install -e ".[tpu]"
  python benchmarks/aot_fit.py [--configs meki_0p6b,dense_0p6b] [--max_size 256]
  python benchmarks/aot_fit.py --table v5p-64 [--settings mlp,full,full_offload_input]

Every figure comes from compiling the real train step ahead of time (meki_jax/train/aot.py,
the same as tools/aot_compile.py). A setting is a remat policy and what lives in host memory
(SETTINGS). Search mode prefers fewer accumulation steps over smaller slices: for
grad_accum_steps = 1, 2, 4, ... it tries v5p-8, v5p-16, ... up to --max_size, and on each slice
the settings in order: the recipe's 'mlp', then 'full', and only when neither fits in HBM the
host-offload settings; the first that fits is reported. Table mode compiles every config with
each setting at --table's topology with no accumulation and prints the README's table. --json
prints one JSON line per compile.
"""

import argparse
import importlib
import json
import os
import time

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # an AOT compile opens no chip
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from meki_jax.train.aot import compile_train_step, parse_topology  # noqa: E402

OFFLOAD_STATE = {'optim.params_on_host': True, 'optim.opt_state_on_host': True}
SETTINGS = {  # name -> config overrides; SEARCH_SETTINGS: those search mode tries, in order
    'mlp': {'model.remat_policy': 'mlp'},  # the recipe's selective recompute
    'full': {'model.remat_policy': 'full'},  # recompute all, keep each layer's input
    # each layer's input in host memory: nothing of the layer loop stays in HBM
    'full_offload_input': {'model.remat_policy': 'full', 'model.remat_offload': ('layer_input',)},
    # the parameters and both Adam moments in host memory
    'full_offload_state': {'model.remat_policy': 'full', **OFFLOAD_STATE},
    # both: each layer's input, the parameters and both Adam moments in host memory
    'full_offload_input_state': {'model.remat_policy': 'full',
                                 'model.remat_offload': ('layer_input',), **OFFLOAD_STATE},
    'mlp_qkv': {'model.remat_policy': 'mlp_qkv'},
    # what mlp keeps in host memory, but the splash kernel's context (see model/remat.py)
    'mlp_offload': {'model.remat_policy': 'mlp', 'model.remat_offload': (
        'layer_input', 'value', 'attn_out')},
}
SEARCH_SETTINGS = ('mlp', 'full', 'full_offload_input', 'full_offload_input_state')
TABLE_SETTINGS = ('mlp', 'full')
PAPER_CONFIGS = ('dense_0p6b', 'meki_0p6b', 'dense_1p7b', 'meki_1p7b', 'dense_4b', 'meki_4b')


def compile_config(name, topology, setting, grad_accum_steps, as_json):
  """Compiles `configs/<name>.py` with a SETTINGS entry and accumulation; returns the result."""
  config = importlib.import_module(f'configs.{name}').get_config()
  for field, value in SETTINGS[setting].items():
    section, key = field.split('.')
    config[section][key] = value
  config.train.grad_accum_steps = grad_accum_steps
  start = time.perf_counter()
  result = compile_train_step(config, topology)
  result.update(config=name, setting=setting, compile_seconds=time.perf_counter() - start)
  if as_json:
    print(json.dumps(result), flush=True)
  return result


def smallest_fit(name, max_size, settings, as_json):
  """The first fitting (accumulation, slice, setting), accumulation outermost; None if none."""
  sizes = [8 * 2**i for i in range(16) if 8 * 2**i <= max_size]
  global_batch = importlib.import_module(f'configs.{name}').get_config().train.global_batch_size
  for accum in (2**i for i in range(9)):
    for size in sizes:
      topology = parse_topology(f'v5p-{size}')
      if global_batch % (accum * topology.chips):  # every chip holds a row of each micro-batch
        continue
      for setting in settings:
        result = compile_config(name, topology, setting, accum, as_json)
        if result['fits']:
          return result
  return None


def _row(result):
  start = (f"| {result['config']} | {result['topology']} | {result['setting']} | "
           f"{result['grad_accum_steps']} | {result['attention']} | ")
  flops = f"{result['model_tflops_per_step']:.0f} | {result['program_tflops_per_step']:.0f} |"
  if 'error' in result:
    return start + '| | does not fit | | ' + flops
  return start + (f"{result['argument_gib']:.2f} | {result['temporary_gib']:.2f} | "
                  f"{result['total_gib']:.2f} / {result['hbm_gib']} | "
                  f"{result['host_total_gib']:.2f} | " + flops)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(PAPER_CONFIGS))
  parser.add_argument('--max_size', type=int, default=256, help='largest v5p-N to try')
  parser.add_argument('--table', default='', help='a topology, e.g. v5p-64: table mode')
  parser.add_argument('--settings', default='', help=f'of {tuple(SETTINGS)}; default '
                      f'{",".join(TABLE_SETTINGS)} (table), {",".join(SEARCH_SETTINGS)} (search)')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  settings = tuple(args.settings.split(',')) if args.settings else (
      TABLE_SETTINGS if args.table else SEARCH_SETTINGS)
  unknown = [setting for setting in settings if setting not in SETTINGS]
  if unknown:
    parser.error(f'--settings: {unknown} not in {tuple(SETTINGS)}')
  rows = []
  for name in args.configs.split(','):
    if args.table:
      results = [compile_config(name, parse_topology(args.table), setting, 1, args.json)
                 for setting in settings]
    else:
      results = [smallest_fit(name, args.max_size, settings, args.json)]
    for result in results:
      rows.append(f'| {name} | none up to v5p-{args.max_size} | | | | | | | | | |'
                  if result is None else _row(result))
      print(rows[-1], flush=True)
  print('| config | topology | setting | grad accum | attention | arguments GiB/device | '
        'temporaries GiB/device | HBM GiB/device | host GiB/device | model TFLOPs/step | '
        'program TFLOPs/step |')
  print('|---|---|---|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
