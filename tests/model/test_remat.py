"""The remat policies keep what they say: residuals saved for the backward pass, by shape."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from jax._src.ad_checkpoint import saved_residuals

from meki_jax.model.transformer import build_model

BATCH, SEQ, D_FF = 2, 16, 72  # d_ff 72 appears in no other activation


def _saved_shapes(config):
  """Shapes of the residuals the backward pass keeps for a loss of the model's logits."""
  model = build_model(config)
  tokens = jnp.zeros((BATCH, SEQ), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)['params'])
  loss = lambda p: jnp.sum(model.apply({'params': p}, tokens, hidden_only=True))
  return [tuple(aval.shape) for aval, _ in saved_residuals(loss, params)]


def _has(shapes, suffix):
  return any(shape[-len(suffix):] == suffix for shape in shapes)


@pytest.mark.parametrize('policy,keeps_qkv,keeps_context,keeps_mlp_hidden', [
    ('none', True, True, True), ('mlp', True, True, False), ('mlp_qkv', False, True, False),
    ('full', False, False, False)])
def test_remat_policy_keeps_attention_and_drops_the_mlp_hidden(tiny_model_config, policy,
                                                               keeps_qkv, keeps_context,
                                                               keeps_mlp_hidden):
  config = tiny_model_config(d_ff=D_FF, remat_policy=policy)
  shapes = _saved_shapes(config)
  query = (BATCH, SEQ, config.num_heads, config.head_dim)
  key = (BATCH, SEQ, config.num_kv_heads, config.head_dim)
  group = config.num_heads // config.num_kv_heads
  context = (BATCH, SEQ, config.num_kv_heads, group, config.head_dim)  # the attention's output
  assert _has(shapes, query) == keeps_qkv, shapes
  assert _has(shapes, key) == keeps_qkv, shapes
  assert _has(shapes, context) == keeps_context, shapes
  assert _has(shapes, (BATCH, SEQ, D_FF)) == keeps_mlp_hidden, shapes
  assert _has(shapes, (config.num_layers, BATCH, SEQ, config.d_model))  # each layer's input
