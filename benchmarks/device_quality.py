"""Held-out loss through the shipped programs: fp32, int8 and int4 tables, 8da4w backbones.

  python benchmarks/device_quality.py --workdir=runs/repro-meki --work_dir=/tmp/device-quality \
      [--tokens=20000] [--table_group_size=32] [--group_size=32]

--workdir is a trained MeKi run; if it has no checkpoint, `configs/repro.py:meki` (the quick
start's backbone on the embedded corpus, 400 steps) is trained into it first. Its newest
checkpoint is exported with fp32, int8 and int4 tables (export_memory), and each export to
ExecuTorch programs (every position's logits, a cache of one row) with an fp32 backbone, and
with 8da4w linears + an 8-bit embedding. Every program computes the loss of the run's held-out
rows (the trainer's evaluation stream, at least --tokens loss tokens) segment by segment
(export/device_eval.py); the JAX model's loss on the same rows is the reference.
"""

import argparse
import os
import pathlib
import subprocess
import sys

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # a CPU benchmark: libtpu, if installed, stays idle
import jax  # noqa: E402
import numpy as np  # noqa: E402

from meki_jax import run_config  # noqa: E402
from meki_jax.config import validate  # noqa: E402
from meki_jax.data.pipeline import make_eval_dataset  # noqa: E402
from meki_jax.export import (device_eval, device_runtime, exporter, memory_store,  # noqa: E402
                             to_device)
from meki_jax.export.checkpoint_reader import checkpoint_step_dir  # noqa: E402
from meki_jax.model.transformer import build_model  # noqa: E402
from meki_jax.train import step as step_lib  # noqa: E402

VARIANTS = (  # (name, table scheme, qlinear, qembedding)
    ('fp32 tables, fp32 backbone', 'float32', None, None),
    ('int8 tables, fp32 backbone', 'int8', None, None),
    ('int4 tables, fp32 backbone', 'int4', None, None),
    ('fp32 tables, 8da4w + 8w backbone', 'float32', '8da4w', '8w'),
    ('int8 tables, 8da4w + 8w backbone', 'int8', '8da4w', '8w'),
)


def eval_batches(config, tokens):
  """The run's evaluation batches (numpy), enough for `tokens` loss tokens."""
  batches, count = [], 0
  for batch in make_eval_dataset(config.data, global_batch_size=config.train.global_batch_size):
    batches.append({key: np.asarray(value) for key, value in batch.items()})
    count += int(batches[-1]['loss_mask'].sum())
    if count >= tokens:
      return batches
  raise ValueError(f'the evaluation stream holds {count} loss tokens, fewer than --tokens='
                   f'{tokens}')


def jax_loss(config, step_dir, batches):
  """(sum, count) of the trained (unfolded) JAX model's token losses over `batches`."""
  params, _ = exporter.restore_params(config, step_dir)
  eval_fn = jax.jit(lambda params, batch: step_lib.eval_step(
      params, batch, model=build_model(config.model)))
  sums = [eval_fn(params, batch) for batch in batches]
  return sum(float(total) for total, _ in sums), sum(int(count) for _, count in sums)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--workdir', required=True, type=pathlib.Path)
  parser.add_argument('--work_dir', required=True, type=pathlib.Path)
  parser.add_argument('--tokens', type=int, default=20_000)
  parser.add_argument('--table_group_size', type=int, default=32)
  parser.add_argument('--group_size', type=int, default=32)
  args = parser.parse_args()
  if not (args.workdir / 'checkpoints').exists():
    subprocess.run([sys.executable, '-m', 'meki_jax.train', '--config=configs/repro.py:meki',
                    f'--workdir={args.workdir}'], check=True)
  config = validate(run_config.load(args.workdir))
  step_dir = checkpoint_step_dir(args.workdir)
  batches = eval_batches(config, args.tokens)
  reference_sum, reference_count = jax_loss(config, step_dir, batches)
  print(f'{step_dir}: {len(batches)} held-out batches, {reference_count} loss tokens; JAX '
        f'loss {reference_sum / reference_count:.5f}')

  vocabulary = exporter.vocabulary_record(config.data, config.model.vocab_size)
  results = []
  for name, scheme, qlinear, qembedding in VARIANTS:
    memory_dir = args.work_dir / f'memory-{scheme}'
    if not memory_dir.exists():
      exporter.export_checkpoint(step_dir, config.model, memory_dir, dtype=scheme,
                                 table_group_size=args.table_group_size, vocabulary=vocabulary)
    device_dir = args.work_dir / f'device-{scheme}-{qlinear or "fp32"}'
    if not device_dir.exists():
      to_device.write_device_export(memory_dir, device_dir, cache_len=config.data.seq_len,
                                    formats=('pte',), qlinear=qlinear,
                                    group_size=args.group_size, qembedding=qembedding,
                                    logits='all')
    device, prefill, decode = device_runtime.device_runners(device_dir, memory_dir, 'pte')
    _, memory = memory_store.open_export(memory_dir)
    session = device_runtime.Session(memory, prefill, decode, device['cache_len'])
    total, count = device_eval.heldout_loss(session, batches)
    assert count == reference_count, (count, reference_count)
    results.append((name, total / count))
    print(f'{name}: {total / count:.5f}', flush=True)

  base = results[0][1]
  print(f'\n{"program":<36}{"held-out loss":>14}{"vs fp32":>10}   ({reference_count} tokens; '
        f'JAX {reference_sum / reference_count:.5f}, fp32 program - JAX '
        f'{base - reference_sum / reference_count:+.1e})')
  for name, loss in results:
    print(f'{name:<36}{loss:>14.5f}{loss - base:>+10.5f}')


if __name__ == '__main__':
  main()
