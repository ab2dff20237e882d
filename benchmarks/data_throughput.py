"""Data pipeline throughput against the trainer's consumption, measured in one run.

For 0, 1 and 2 grain worker processes, at seq_len 4096 and at the quick start's seq_len, times
packed batches of the embedded corpus (tokens/s after the first batch, which pays for starting
the workers), and times jitted train steps of configs/quickstart.py's model on this machine
(tokens per step / seconds per step). A pipeline/trainer ratio above 1 means the input pipeline
keeps up. Also prints the packing efficiency: the mean of segment_ids > 0 (non-padding share).

  python benchmarks/data_throughput.py [--seconds 6] [--train_steps 5]
"""

import argparse
import functools
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from configs import quickstart
from meki_jax import sharding
from meki_jax.config import validate
from meki_jax.data.pipeline import make_eval_dataset, make_train_dataset
from meki_jax.model.transformer import build_model
from meki_jax.train import optim, state as state_lib, step as step_lib

LONG_SEQ_LEN = 4096
WORKER_COUNTS = (0, 1, 2)


def pipeline_rate(data_config, batch_size, seconds):
  """(tokens/s after the first batch, seconds to the first batch) of the training stream."""
  start = time.perf_counter()
  iterator = iter(make_train_dataset(data_config, global_batch_size=batch_size))
  next(iterator)
  first = time.perf_counter() - start
  batches, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    next(iterator)
    batches += 1
  rate = batches * batch_size * data_config.seq_len / (time.perf_counter() - start)
  iterator.close()  # stops the worker processes
  return rate, first


def packing_efficiency(data_config, batch_size, batches):
  """Mean of segment_ids > 0 over the first `batches` training and all evaluation batches."""
  iterator = iter(make_train_dataset(data_config, global_batch_size=batch_size))
  train = np.mean([np.mean(next(iterator)['segment_ids'] > 0) for _ in range(batches)])
  evaluation = np.concatenate([b['segment_ids'].reshape(-1) > 0 for b in
                               make_eval_dataset(data_config, global_batch_size=batch_size)])
  return train, float(np.mean(evaluation))


def trainer_rate(config, steps):
  """Tokens/s of jitted train steps (after the compiling one) of `config`'s model."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  _, state_shardings = state_lib.state_shardings(model, optimizer, mesh, rules)
  state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0))
  batch_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length'), rules))
  train_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer, schedule=schedule,
                        grad_accum_steps=config.train.grad_accum_steps),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
  iterator = iter(make_train_dataset(config.data, global_batch_size=config.train.global_batch_size))
  batches = [{key: jax.device_put(value, batch_sharding) for key, value in next(iterator).items()
              if key in step_lib.BATCH_KEYS} for _ in range(steps + 1)]
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, metrics = train_fn(state, batches[0])  # compiles
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for batch in batches[1:]:
      state, metrics = train_fn(state, batch)
    jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  return config.train.global_batch_size * config.data.seq_len / seconds, seconds


def main(seconds, train_steps):
  config = validate(quickstart.get_config())
  batch_size = config.train.global_batch_size
  print(f'{jax.device_count()} {jax.devices()[0].platform} device(s); embedded corpus '
        f'{config.data.train_sources[0]["path"]}; batches of {batch_size} rows')
  trainer, step_seconds = trainer_rate(config, train_steps)
  print(f'trainer (configs/quickstart.py, {batch_size} x {config.data.seq_len} tokens/step): '
        f'{trainer:,.0f} tokens/s ({step_seconds * 1e3:.0f} ms/step)')
  for seq_len in (LONG_SEQ_LEN, config.data.seq_len):
    for num_workers in WORKER_COUNTS:
      data_config = config.data.copy_and_resolve_references()
      data_config.seq_len, data_config.num_workers = seq_len, num_workers
      rate, first = pipeline_rate(data_config, batch_size, seconds)
      print(f'pipeline seq_len {seq_len:5d}, {num_workers} workers: {rate:13,.0f} tokens/s '
            f'(first batch after {first:4.1f} s)  pipeline/trainer = {rate / trainer:8.1f}')
  for seq_len in (LONG_SEQ_LEN, config.data.seq_len):
    data_config = config.data.copy_and_resolve_references()
    data_config.seq_len = seq_len
    train, evaluation = packing_efficiency(data_config, batch_size, 20)
    print(f'packing efficiency seq_len {seq_len:5d}: train {train:.4f}, '
          f'eval (finite, tail padded) {evaluation:.4f}')


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--seconds', type=float, default=6.0, help='timing window per pipeline')
  parser.add_argument('--train_steps', type=int, default=5, help='timed train steps')
  args = parser.parse_args()
  sys.exit(main(args.seconds, args.train_steps))
