"""Smallest v5p slice that trains each paper model at the recipe's global batch (256 x 4096).

  pip install -e ".[tpu]"
  JAX_PLATFORMS=cpu python benchmarks/aot_fit.py [--configs meki_0p6b,dense_0p6b] [--max_size 256]

For every config it compiles the real train step ahead of time (meki_jax/train/aot.py) for
v5p-8, v5p-16, ... and stops at the first slice whose per-device total fits the chip's 95 GiB
HBM. Gradient accumulation keeps one 4096-token sequence per chip per micro-batch
(grad_accum_steps = 256 / chips), so every slice sees the same 256 x 4096 optimizer step; on
each slice the 'mlp' remat policy (keeps the attention scores: 1-2 GiB per layer and sequence
at 4096 tokens in fp32) is tried first, then 'full' (keeps only each layer's input).
Prints a markdown table (the README's) and, with --json, one JSON line per compile.
"""

import argparse
import importlib
import json
import time

from meki_jax.train.aot import compile_train_step, parse_topology

REMAT_POLICIES = ('mlp', 'full')  # the recipe's selective recompute first, then recompute all
PAPER_CONFIGS = ('dense_0p6b', 'meki_0p6b', 'dense_1p7b', 'meki_1p7b', 'dense_4b', 'meki_4b')


def smallest_fit(name, max_size, as_json):
  """Compiles `configs/<name>.py` on growing v5p slices; returns the first result that fits."""
  for size in (8 * 2**i for i in range(16)):
    if size > max_size:
      return None
    topology = parse_topology(f'v5p-{size}')
    for remat_policy in REMAT_POLICIES:
      config = importlib.import_module(f'configs.{name}').get_config()
      config.model.remat_policy = remat_policy
      config.train.grad_accum_steps = max(1, config.train.global_batch_size // topology.chips)
      start = time.perf_counter()
      result = compile_train_step(config, topology)
      result.update(config=name, remat_policy=remat_policy,
                    grad_accum_steps=config.train.grad_accum_steps,
                    compile_seconds=time.perf_counter() - start)
      if as_json:
        print(json.dumps(result), flush=True)
      if result['fits']:
        return result
  return None


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--configs', default=','.join(PAPER_CONFIGS))
  parser.add_argument('--max_size', type=int, default=256, help='largest v5p-N to try')
  parser.add_argument('--json', action='store_true')
  args = parser.parse_args()
  rows = []
  for name in args.configs.split(','):
    result = smallest_fit(name, args.max_size, args.json)
    if result is None:
      rows.append(f'| {name} | none up to v5p-{args.max_size} | | | | | | |')
      continue
    rows.append(f"| {name} | {result['topology']} ({result['chips']} chips) | "
                f"{result['remat_policy']} | {result['grad_accum_steps']} | "
                f"{result['argument_gib']:.1f} | "
                f"{result['temporary_gib']:.1f} | {result['total_gib']:.1f} / "
                f"{result['hbm_gib']} | {result['model_tflops_per_step']:.0f} |")
    print(rows[-1], flush=True)
  print('| config | smallest v5p | remat | grad accum | arguments GiB/device | temporaries '
        'GiB/device | total GiB/device / HBM | model TFLOPs/step |')
  print('|---|---|---|---|---|---|---|---|')
  print('\n'.join(rows))


if __name__ == '__main__':
  main()
