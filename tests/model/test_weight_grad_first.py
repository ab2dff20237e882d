"""Dense layers whose kernel gradient is computed together with their input's (layers.py)."""

import flax.linen as nn
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from meki_jax.model.layers import _project, project_weight_grad_first
from meki_jax.model.transformer import build_model


@pytest.mark.parametrize('in_axes', [1, 2])
def test_values_and_gradients_equal_the_plain_projection(in_axes):
  x = jax.random.normal(jax.random.PRNGKey(0), (3, 5, 4, 6))
  kernel = jax.random.normal(jax.random.PRNGKey(1), (4, 6, 7, 2)[2 - in_axes:])

  def loss_and_grads(project):
    loss = lambda x, kernel: jnp.sum(jnp.sin(project(x, kernel, in_axes)))
    return loss(x, kernel), jax.grad(loss, argnums=(0, 1))(x, kernel)

  loss, grads = loss_and_grads(project_weight_grad_first)
  plain_loss, plain_grads = loss_and_grads(_project)
  np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
  for grad, plain in zip(grads, plain_grads):
    assert grad.shape == plain.shape
    np.testing.assert_allclose(grad, plain, rtol=1e-5, atol=1e-5)


def _barriers(jaxpr):
  """The optimization_barrier equations in a jaxpr and every jaxpr nested in it."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == 'optimization_barrier':
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _barriers(sub)
  return found


def _backward_barriers(config):
  """The barriers in the backward pass of a sum over the model's final hidden state."""
  model = build_model(config)
  tokens = jnp.zeros((2, 8), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)['params'])
  loss = lambda p: jnp.sum(model.apply({'params': p}, tokens, hidden_only=True))
  return _barriers(jax.make_jaxpr(jax.grad(loss))(params).jaxpr)


@pytest.mark.parametrize('d_mem', [8, 0], ids=['meki', 'dense'])
def test_the_backward_pass_ties_the_ffn_gate_up_and_meki_output_gradients(tiny_model_config,
                                                                          d_mem):
  """The scanned layer's backward holds one barrier per such kernel, pairing [.., d_in]
  input gradients with the kernel's gradient: FFN gate and up [d_model, d_ff] and, with
  MeKi, the FFN's down [d_ff, d_model] (not under 'full') and MeKi's output projection
  [d_mem, d_model]; none with model.weight_grad_first off."""
  config = tiny_model_config(meki=dict(d_mem=d_mem), remat_policy='mlp')
  barriers = _backward_barriers(config)
  kernels = sorted(tuple(eqn.outvars[1].aval.shape) for eqn in barriers)
  expected = [(config.d_model, config.d_ff)] * 2
  if d_mem:
    expected += [(config.d_ff, config.d_model), (d_mem, config.d_model)]
  assert kernels == sorted(expected)
  for eqn in barriers:
    assert eqn.outvars[0].aval.shape[-1] == eqn.outvars[1].aval.shape[0]  # x grad [.., d_in]
  assert not _backward_barriers(tiny_model_config(meki=dict(d_mem=d_mem), remat_policy='mlp',
                                                  weight_grad_first=False))
  full = _backward_barriers(tiny_model_config(meki=dict(d_mem=d_mem), remat_policy='full'))
  assert len(full) == len(expected) - (1 if d_mem else 0)
