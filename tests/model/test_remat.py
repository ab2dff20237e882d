"""The remat policies keep what they say: residuals saved for the backward pass, by shape."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src.ad_checkpoint import saved_residuals

from meki_jax.model.transformer import build_model

BATCH, SEQ, D_FF = 2, 16, 72  # d_ff 72 appears in no other activation


def _loss_and_params(config, seq=SEQ, init=jax.eval_shape):
  """(params -> a loss of the model's hidden state, params or their shapes)."""
  model = build_model(config)
  tokens = (jnp.arange(BATCH * seq, dtype=jnp.int32) % config.vocab_size).reshape(BATCH, seq)
  params = nn.meta.unbox(init(model.init, jax.random.PRNGKey(0), tokens)['params'])
  loss = lambda p: jnp.sum(model.apply({'params': p}, tokens, hidden_only=True) ** 2)
  return loss, params


def _saved_shapes(config, seq=SEQ):
  """Shapes of the residuals the backward pass keeps for a loss of the model's hidden state."""
  return [tuple(aval.shape) for aval, _ in saved_residuals(*_loss_and_params(config, seq))]


def _has(shapes, suffix):
  return any(shape[-len(suffix):] == suffix for shape in shapes)


@pytest.mark.parametrize('policy,qk_norm,keeps_qk,keeps_v,keeps_context,keeps_mlp_hidden', [
    ('none', True, True, True, True, True),
    ('mlp', False, True, True, True, False),
    # q/k RMSNorm: the backward runs the q and k projections anyway; norm and RoPE are redone
    ('mlp', True, False, True, True, False),
    ('mlp_qkv', False, False, False, True, False),
    ('full', True, False, False, False, False)])
def test_remat_policy_keeps_attention_and_drops_the_mlp_hidden(
    tiny_model_config, policy, qk_norm, keeps_qk, keeps_v, keeps_context, keeps_mlp_hidden):
  config = tiny_model_config(d_ff=D_FF, remat_policy=policy, qk_norm=qk_norm)
  shapes = _saved_shapes(config)
  query = (BATCH, SEQ, config.num_heads, config.head_dim)
  key = (BATCH, SEQ, config.num_kv_heads, config.head_dim)
  group = config.num_heads // config.num_kv_heads
  context = (BATCH, SEQ, config.num_kv_heads, group, config.head_dim)  # the attention's output
  assert _has(shapes, query) == keeps_qk, shapes
  assert _has(shapes, key) == keeps_v, shapes  # k and v have one shape: v, or k and v
  assert _has(shapes, context) == keeps_context, shapes
  assert _has(shapes, (BATCH, SEQ, D_FF)) == keeps_mlp_hidden, shapes
  assert _has(shapes, (config.num_layers, BATCH, SEQ, config.d_model))  # each layer's input


def test_splash_context_is_kept_once(tiny_model_config):
  """The splash kernel names its output and logsumexp; its output transposed back to q's layout
  is not kept a second time (each layer kept two q-sized copies before)."""
  config = tiny_model_config(remat_policy='mlp', attention='splash', head_dim=128,
                             attention_block=128)
  shapes = _saved_shapes(config, seq=128)
  q_size = config.num_layers * BATCH * 128 * config.num_heads * config.head_dim
  q_sized = [shape for shape in shapes if math.prod(shape) == q_size]
  assert q_sized == [(config.num_layers, BATCH, config.num_heads, 128, config.head_dim)], shapes


def test_offloaded_activations_are_kept_in_host_memory_with_the_same_gradients(
    tiny_model_config):
  offload = ('layer_input', 'value', 'context', 'attn_out')
  config = tiny_model_config(d_ff=D_FF, remat_policy='mlp', remat_offload=offload,
                             attention='xla')  # the splash context is not offloadable
  loss, params = _loss_and_params(config, init=lambda f, *args: f(*args))
  on_host = sorted(aval.shape for aval, _ in saved_residuals(loss, params)
                   if aval.memory_space == jax.memory.Space.Host)
  layers, kv_heads = config.num_layers, config.num_kv_heads
  group, head_dim = config.num_heads // kv_heads, config.head_dim
  assert on_host == sorted([(layers, BATCH, SEQ, config.d_model)] * 2  # input, attn_out
                           + [(layers, BATCH, SEQ, kv_heads, head_dim),  # value
                              (layers, BATCH, SEQ, kv_heads, group, head_dim)])  # context
  in_hbm_loss, _ = _loss_and_params(tiny_model_config(d_ff=D_FF, remat_policy='mlp',
                                                      attention='xla'))
  offloaded, in_hbm = jax.jit(jax.grad(loss))(params), jax.jit(jax.grad(in_hbm_loss))(params)
  for a, b in zip(jax.tree_util.tree_leaves(offloaded), jax.tree_util.tree_leaves(in_hbm)):
    np.testing.assert_array_equal(a, b)
