"""A small trained MeKi model, its training checkpoint and its fp32 export with the JAX
reference generation, shared by the export tests."""

import functools
import json
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from meki_jax import decode, sharding
from meki_jax.export import exporter
from meki_jax.fold import fold_params
from meki_jax.model.transformer import build_model
from meki_jax.train import checkpoint, optim, state as state_lib, step as step_lib

CONFIG_FILE = '''
from configs import base

def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(num_layers=2, d_model=32, num_heads=4, num_kv_heads=2,
                                   d_ff=64, d_mem=8)
  config.model.update(head_dim=16, dtype='float32', remat_policy='none')
  config.train.update(num_steps=36, global_batch_size=8)
  config.optim.update(peak_lr=2e-2, end_lr=2e-3, warmup_steps=3)
  return config
'''
CYCLE_START, CYCLE_LEN = 1000, 48  # the training text: ids 1000..1047 in a fixed cyclic order


def cycle_successor():
  """next[id] for the ids of the training cycle (a fixed random permutation of them)."""
  order = CYCLE_START + np.random.default_rng(0).permutation(CYCLE_LEN)
  return dict(zip(order, np.roll(order, -1)))


def _batches(batch, seq_len, seed):
  successor = cycle_successor()
  rng = np.random.default_rng(seed)
  while True:
    rows = [[int(rng.integers(CYCLE_START, CYCLE_START + CYCLE_LEN))] for _ in range(batch)]
    for row in rows:
      while len(row) <= seq_len:
        row.append(successor[row[-1]])
    tokens = np.array(rows, np.int32)
    yield {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
           'segment_ids': np.ones((batch, seq_len), np.int32),
           'positions': np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)),
           'loss_mask': np.ones((batch, seq_len), np.float32)}


def moved_params(model_config):
  """Initial params moved off their init values (alpha, beta and norm scales != 1), as numpy;
  one initialisation per config for the whole session."""
  return _moved_params(model_config.to_json())


@functools.lru_cache(maxsize=None)
def _moved_params(config_json):
  model = build_model(ml_collections.ConfigDict(json.loads(config_json)))
  token_ids = np.zeros((1, 1), np.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), token_ids)['params'])
  rng = np.random.default_rng(0)
  move = lambda p: (p + 0.5 * np.std(p) * rng.standard_normal(p.shape) if p.ndim > 1
                    else p * rng.uniform(0.5, 2.0, p.shape)).astype(np.float32)
  return jax.tree_util.tree_map(lambda p: move(np.asarray(p)), params)


@pytest.fixture(scope='session')
def trained_run(tmp_path_factory):
  """(config, workdir, config file): a model trained with the real train step until it
  continues the cycle confidently, saved as a training checkpoint. One device: on 2 CPU cores
  the 8-device mesh doubles the time (tests/export/test_exporter.py restores from 8)."""
  workdir = tmp_path_factory.mktemp('trained')
  config_file = workdir / 'config.py'
  config_file.write_text(CONFIG_FILE)
  namespace = {}
  exec(CONFIG_FILE, namespace)  # noqa: S102  (the same config the CLI loads from the file)
  config = namespace['get_config']()
  steps = config.train.num_steps
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, steps)
  mesh, rules = sharding.make_mesh(config.mesh, jax.devices()[:1]), sharding.axis_rules(config.mesh)
  state = state_lib.create_state(model, optimizer, mesh, rules, jax.random.PRNGKey(0))
  train_step = jax.jit(functools.partial(
      step_lib.train_step, model=model, optimizer=optimizer,
      schedule=optim.learning_rate_schedule(config.optim, steps), grad_accum_steps=1))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    for _, batch in zip(range(steps), _batches(config.train.global_batch_size, 32, seed=0)):
      state, metrics = train_step(state, batch)
  assert float(metrics['loss']) < 0.3, float(metrics['loss'])  # the cycle is learnt
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  checkpoint.save(manager, steps, state, None, force=True)
  manager.wait_until_finished()
  manager.close()
  return config, workdir, config_file


STEPS = 32
CACHE_LEN = 64
PROMPT = [CYCLE_START + 7, CYCLE_START + 30, CYCLE_START + 11, CYCLE_START + 2]


@pytest.fixture(scope='session')
def exported(trained_run, tmp_path_factory):
  """(export dir, JAX reference) for the trained model, exported by the CLI in fp32."""
  config, workdir, config_file = trained_run
  out = tmp_path_factory.mktemp('export') / 'model'
  subprocess.run([sys.executable, 'tools/export_memory.py', f'--config={config_file}',
                  f'--checkpoint={workdir}', f'--out={out}', '--dtype=float32',
                  '--rows_per_shard=16384'], check=True)
  params, _ = exporter.restore_params(config, workdir)
  return out, jax_reference(params, config.model)


def jax_reference(params, model_config):
  """The JAX folded model on PROMPT: prefill logits [t, vocab], then STEPS greedy tokens and the
  logits each was chosen from [STEPS, vocab] (meki_jax.decode with its KV cache)."""
  folded = fold_params(params, model_config)
  prompt = jnp.array([PROMPT], jnp.int32)
  prefill_logits = build_model(model_config, folded=True).apply({'params': folded}, prompt)[0]
  model = build_model(model_config, folded=True, decode=True)
  decode_params = decode.decode_params(folded, model_config)
  cache = decode.init_cache(model_config, 1, CACHE_LEN)
  cache = decode.prefill(model, decode_params, cache, prompt[:, :-1], 0)
  token, position, tokens, logits = prompt[:, -1], len(PROMPT) - 1, [], []
  for _ in range(STEPS):  # the first step feeds the last prompt token
    token, step_logits, cache = decode.decode_step(
        model, decode_params, cache, token, jnp.array([position]), jax.random.PRNGKey(0),
        decode.Sampling())
    tokens.append(int(token[0]))
    logits.append(np.asarray(step_logits[0]))
    position += 1
  return {'prefill_logits': np.asarray(prefill_logits), 'tokens': tokens,
          'logits': np.stack(logits)}
