"""Training cost of MeKi against its dense twin: measured step time and the FLOPs formula.

  JAX_PLATFORMS=cpu python benchmarks/train_throughput.py [--config configs/quickstart.py]
      [--steps 20] [--rounds 3] [--seq_len 1024]

Builds the dense twin (meki.d_mem = 0) and the MeKi variants of one config, times the jitted
train step (parameters, AdamW state and one real batch from the grain pipeline on this host's
devices) in interleaved rounds, so both see the same machine load, and prints tokens/s, the
ratio to dense and the ratio the analytic FLOPs formula (meki_jax/train/flops.py) predicts.
The second table times dense and MeKi against the same models on the reference path (XLA
attention, whole logits in the loss: the trainer before the memory-efficient attention and the
chunked loss), so any cost of those shows as a ratio below 1. The last table is the FLOPs
formula at the paper's sizes (seq 4096), where the backbone dominates.
"""

import argparse
import functools
import importlib.util
import statistics
import time

import flax.linen as nn
import jax
from jax.sharding import NamedSharding, PartitionSpec

from meki_jax import sharding
from meki_jax.config import validate
from meki_jax.data.pipeline import make_train_dataset
from meki_jax.model.attention import resolve_attention
from meki_jax.model.transformer import build_model
from meki_jax.train import flops, optim, state as state_lib, step as step_lib

VARIANTS = {  # name -> MeKi overrides (None: the dense twin)
    'dense': None,
    'meki (both)': dict(memory='both'),
    'meki static-only': dict(memory='static'),
    'meki dynamic-only': dict(memory='dynamic'),
}
REFERENCE = dict(attention='xla', loss_chunk_len=0)  # model overrides: the reference path
PAPER_CONFIGS = ('0p6b', '1p7b', '4b')


def load_config(path):
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def variant_config(config, overrides, model_overrides=None):
  config = config.copy_and_resolve_references()
  if overrides is None:
    config.model.meki.update(d_mem=0, enabled=False)
  else:
    config.model.meki.update(overrides)
  config.model.update(model_overrides or {})
  return validate(config)


def timed_step(config, batch):
  """A function that runs `steps` train steps and returns seconds per step."""
  mesh, rules = sharding.make_mesh(config.mesh), sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  schedule = optim.learning_rate_schedule(config.optim, config.train.num_steps)
  _, shardings = state_lib.state_shardings(model, optimizer, mesh, rules)
  batch_sharding = NamedSharding(mesh, nn.logical_to_mesh_axes(('batch', 'length'), rules))
  step_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                        schedule=schedule, grad_accum_steps=config.train.grad_accum_steps),
      in_shardings=(shardings, batch_sharding),
      out_shardings=(shardings, NamedSharding(mesh, PartitionSpec())), donate_argnums=0)
  state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0))
  batch = jax.device_put(batch, batch_sharding)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, metrics = step_fn(state, batch)  # compile
    jax.block_until_ready(metrics)
  holder = [state]

  def run(steps):
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      start = time.perf_counter()
      for _ in range(steps):
        holder[0], metrics = step_fn(holder[0], batch)
      jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / steps

  return run


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/quickstart.py')
  parser.add_argument('--steps', type=int, default=20, help='steps per timed round')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--seq_len', type=int, default=0, help="override the config's data.seq_len")
  args = parser.parse_args()
  base = load_config(args.config)
  if args.seq_len:
    base.data.seq_len = args.seq_len
  dataset = make_train_dataset(base.data, global_batch_size=base.train.global_batch_size,
                               process_index=0, process_count=1, seed=0)
  batch = next(iter(dataset))
  tokens = base.train.global_batch_size * base.data.seq_len
  configs = {name: variant_config(base, overrides) for name, overrides in VARIANTS.items()}
  references = {f'{name} (reference path)': variant_config(base, VARIANTS[name], REFERENCE)
                for name in ('dense', 'meki (both)')}
  runners = {name: timed_step(config, batch) for name, config in {**configs, **references}.items()}
  seconds = {name: [] for name in runners}
  for _ in range(args.rounds):  # interleaved: every variant sees the same machine load
    for name, run in runners.items():
      seconds[name].append(run(args.steps))

  print(f'{args.config}: {tokens} tokens/step, {jax.device_count()} {jax.devices()[0].platform} '
        f'device(s), median of {args.rounds} rounds x {args.steps} steps')
  print('| model | tokens/s | vs dense (measured) | vs dense (FLOPs formula) |')
  print('|---|---|---|---|')
  dense_time = statistics.median(seconds['dense'])
  dense_flops = flops.train_flops_per_token(configs['dense'].model, base.data.seq_len)
  for name, config in configs.items():
    median = statistics.median(seconds[name])
    predicted = flops.train_flops_per_token(config.model, base.data.seq_len) / dense_flops
    print(f'| {name} | {tokens / median:,.0f} | {dense_time / median:.3f} | {1 / predicted:.3f} |')

  attention = resolve_attention(base.model.attention, base.data.seq_len, base.model.head_dim,
                                base.model.attention_block, jax.devices()[0].platform)
  print(f'\nThis path (attention {attention}, loss_chunk_len {base.model.loss_chunk_len}) against '
        'the reference path (attention xla, whole logits)')
  print('| model | tokens/s | reference tokens/s | ratio |')
  print('|---|---|---|---|')
  for name in ('dense', 'meki (both)'):
    median = statistics.median(seconds[name])
    reference = statistics.median(seconds[f'{name} (reference path)'])
    print(f'| {name} | {tokens / median:,.0f} | {tokens / reference:,.0f} | '
          f'{reference / median:.3f} |')

  print('\nThe FLOPs formula at the paper sizes (seq 4096): MeKi training FLOPs / dense')
  print('| size | dense MFLOPs/token | MeKi MFLOPs/token | ratio |')
  print('|---|---|---|---|')
  for size in PAPER_CONFIGS:
    dense = load_config(f'configs/dense_{size}.py').model
    meki = load_config(f'configs/meki_{size}.py').model
    dense_flops, meki_flops = (flops.train_flops_per_token(model, 4096) for model in (dense, meki))
    print(f'| {size} | {dense_flops / 1e6:.0f} | {meki_flops / 1e6:.0f} | '
          f'{meki_flops / dense_flops:.3f} |')


if __name__ == '__main__':
  main()
