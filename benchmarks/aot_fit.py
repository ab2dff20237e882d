"""Smallest v5p slice and fewest accumulation steps that train each paper model at the recipe's
global batch (256 x 4096), and the recipe-shape table at one topology.

  pip install -e ".[tpu]"
  python benchmarks/aot_fit.py [--configs meki_0p6b,dense_0p6b] [--max_size 256]
  python benchmarks/aot_fit.py --table v5p-64 [--remat mlp,full]

Every figure comes from compiling the real train step ahead of time (meki_jax/train/aot.py,
the same as tools/aot_compile.py). Search mode prefers fewer accumulation steps over smaller
slices: for grad_accum_steps = 1, 2, 4, ... it tries v5p-8, v5p-16, ... up to --max_size, and on
each slice the recipe's 'mlp' remat policy before 'full'; the first that fits is reported.
Table mode compiles every config with each remat policy at --table's topology with no
accumulation and prints the README's table. --json prints one JSON line per compile.
"""

import argparse
import importlib
import json
import os
import time

os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')  # an AOT compile opens no chip
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

from meki_jax.train.aot import compile_train_step, parse_topology  # noqa: E402

REMAT_POLICIES = ('mlp', 'full')  # the recipe's selective recompute first, then recompute all
PAPER_CONFIGS = ('dense_0p6b', 'meki_0p6b', 'dense_1p7b', 'meki_1p7b', 'dense_4b', 'meki_4b')


def compile_config(name, topology, remat_policy, grad_accum_steps, as_json):
  """Compiles `configs/<name>.py` with the given policy and accumulation; returns the result."""
  config = importlib.import_module(f'configs.{name}').get_config()
  config.model.remat_policy = remat_policy
  config.train.grad_accum_steps = grad_accum_steps
  start = time.perf_counter()
  result = compile_train_step(config, topology)
  result.update(config=name, compile_seconds=time.perf_counter() - start)
  if as_json:
    print(json.dumps(result), flush=True)
  return result


def smallest_fit(name, max_size, remat_policies, as_json):
  """The first fitting (accumulation, slice, policy), accumulation outermost; None if none."""
  sizes = [8 * 2**i for i in range(16) if 8 * 2**i <= max_size]
  global_batch = importlib.import_module(f'configs.{name}').get_config().train.global_batch_size
  for accum in (2**i for i in range(9)):
    for size in sizes:
      topology = parse_topology(f'v5p-{size}')
      if global_batch % (accum * topology.chips):  # every chip holds a row of each micro-batch
        continue
      for remat_policy in remat_policies:
        result = compile_config(name, topology, remat_policy, accum, as_json)
        if result['fits']:
          return result
  return None


def _row(result):
  if 'error' in result:
    return (f"| {result['config']} | {result['topology']} | {result['remat_policy']} | "
            f"{result['grad_accum_steps']} | {result['attention']} | | | does not fit | "
            f"{result['model_tflops_per_step']:.0f} |")
  return (f"| {result['config']} | {result['topology']} | {result['remat_policy']} | "
          f"{result['grad_accum_steps']} | {result['attention']} | "
          f"{result['argument_gib']:.2f} | {result['temporary_gib']:.2f} | "
          f"{result['total_gib']:.2f} / {result['hbm_gib']} | "
          f"{result['model_tflops_per_step']:.0f} |")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(PAPER_CONFIGS))
  parser.add_argument('--max_size', type=int, default=256, help='largest v5p-N to try')
  parser.add_argument('--table', default='', help='a topology, e.g. v5p-64: table mode')
  parser.add_argument('--remat', default=','.join(REMAT_POLICIES))
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  policies = tuple(args.remat.split(','))
  rows = []
  for name in args.configs.split(','):
    if args.table:
      results = [compile_config(name, parse_topology(args.table), policy, 1, args.json)
                 for policy in policies]
    else:
      results = [smallest_fit(name, args.max_size, policies, args.json)]
    for result in results:
      rows.append(f'| {name} | none up to v5p-{args.max_size} | | | | | | | |'
                  if result is None else _row(result))
      print(rows[-1], flush=True)
  print('| config | topology | remat | grad accum | attention | arguments GiB/device | '
        'temporaries GiB/device | total GiB/device / HBM | model TFLOPs/step |')
  print('|---|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
