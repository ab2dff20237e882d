"""Matmul FLOPs of traced programs, loops multiplied out: the counts equal the analytic FLOPs
formula where the two describe the same work, and each remat policy adds what it recomputes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from configs import base
from meki_jax.model.attention import self_attention
from meki_jax.model.transformer import build_model
from meki_jax.train import flops, optim, step as step_lib
from meki_jax.train.program_flops import program_flops
from meki_jax.train.state import TrainState

BATCH, SEQ = 2, 64


def test_loops_and_branches_are_counted_as_they_run():
  x = jnp.ones((8, 16))
  weights = jnp.ones((5, 16, 16))
  matmul = 2 * 8 * 16 * 16
  scanned = lambda x, w: jax.lax.scan(lambda h, w: (h @ w, None), x, w)[0]
  assert program_flops(scanned, x, weights) == 5 * matmul
  branch = lambda p, x: jax.lax.cond(p, lambda x: x @ weights[0] @ weights[1], lambda x: x, x)
  assert program_flops(branch, True, x) == 2 * matmul
  unused = lambda x: (x @ weights[0], x @ weights[1])[0]  # dead code does not count
  assert program_flops(unused, x) == matmul


def test_splash_counts_the_key_blocks_its_causal_mask_lets_through():
  """seq 512 in blocks of 128: 4 x 5 / 2 = 10 of the 16 (query, key) block pairs."""
  q = jnp.ones((1, 512, 2, 2, 128))
  k = jnp.ones((1, 512, 2, 128))
  ids = jnp.ones((1, 512), jnp.int32)
  attend = lambda name: functools.partial(self_attention, name, block=128)
  assert program_flops(attend('splash'), q, k, k, ids) == program_flops(
      attend('xla'), q, k, k, ids) * 10 // 16


def _step_flops(remat_policy, **model_overrides):
  config = base.get_config()
  config.model = base.model_config(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2,
                                   d_ff=96, d_mem=model_overrides.pop('d_mem', 0))
  config.model.update(vocab_size=256, head_dim=16, attention='xla', loss_chunk_len=0,
                      remat_policy=remat_policy, **model_overrides)
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, 10)
  tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
  params = nn.meta.unbox(jax.eval_shape(model.init, jax.random.PRNGKey(0), tokens)['params'])
  state = jax.eval_shape(lambda p: TrainState(
      step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p)), params)
  batch = {key: jax.ShapeDtypeStruct((BATCH, SEQ), jnp.float32 if key == 'loss_mask'
                                     else jnp.int32) for key in step_lib.BATCH_KEYS}
  train_step = functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                                 schedule=optim.learning_rate_schedule(config.optim, 10),
                                 grad_accum_steps=1)
  return program_flops(train_step, state, batch), config.model


@pytest.mark.parametrize('d_mem', [0, 16])
def test_a_step_without_remat_costs_the_analytic_three_forward_passes(d_mem):
  """XLA attention (the whole score matrix, as the formula counts), one loss chunk."""
  counted, model_config = _step_flops('none', d_mem=d_mem)
  assert counted == flops.train_flops_per_token(model_config, SEQ) * BATCH * SEQ


@pytest.mark.parametrize('qk_norm', [True, False])
def test_mlp_recomputes_the_ffn_gate_and_up_and_with_qk_norm_the_q_and_k_projections(qk_norm):
  """And the XLA attention's scores q k^T: its backward needs the softmax, which is not kept."""
  kept_all, config = _step_flops('none', qk_norm=qk_norm)
  mlp, _ = _step_flops('mlp', qk_norm=qk_norm)
  per_token = 2 * 2 * config.d_model * config.d_ff  # gate and up
  per_token += 2 * SEQ * config.num_heads * config.head_dim  # scores
  if qk_norm:
    per_token += 2 * config.d_model * (config.num_heads + config.num_kv_heads) * config.head_dim
  assert mlp - kept_all == per_token * config.num_layers * BATCH * SEQ
