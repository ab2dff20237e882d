"""Building blocks with logical axis names: RMSNorm, bias-free dense layers and SwiGLU."""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def normal_init(std, axes):
  """A normal(0, std) initializer whose parameter carries logical `axes`."""
  return nn.with_logical_partitioning(nn.initializers.normal(stddev=std), axes)


class RMSNorm(nn.Module):
  """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32; scale starts at 1.

  x: [..., features] -> [..., features] in `dtype`.
  """
  axis: str  # logical name of the normalised axis
  eps: float = 1e-6
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, (self.axis,)),
                       (x.shape[-1],), self.param_dtype)
    x = x.astype(jnp.float32)
    normed = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + self.eps)
    return (normed * scale.astype(jnp.float32)).astype(self.dtype)


class Dense(nn.Module):
  """A bias-free linear map over the last axes of x: [..., *in] -> [..., *features].

  The kernel has shape [*in, *features] and logical axes `axes` (one name per kernel dim).
  """
  features: int | Sequence[int]
  axes: Sequence[str]
  in_axes: int = 1  # how many trailing axes of x are contracted
  std: float = 0.014
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param('kernel', normal_init(self.std, tuple(self.axes)),
                        in_shape + features, self.param_dtype)
    contract = tuple(range(x.ndim - self.in_axes, x.ndim))
    return jax.lax.dot_general(
        x.astype(self.dtype), kernel.astype(self.dtype),
        ((contract, tuple(range(self.in_axes))), ((), ())))


class SwiGLU(nn.Module):
  """down(silu(gate(x)) * up(x)): [..., d_in] -> [..., d_out] through `hidden` units.

  `in_axis`/`hidden_axis`/`out_axis` are logical names, so the same block serves the FFN
  (embed -> mlp -> embed) and the MeKi projection G (embed -> mlp -> mem).
  """
  hidden: int
  out: int
  in_axis: str = 'embed'
  hidden_axis: str = 'mlp'
  out_axis: str = 'embed'
  std: float = 0.014
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    dense = lambda features, axes, name: Dense(features, axes, std=self.std, dtype=self.dtype,
                                               param_dtype=self.param_dtype, name=name)
    gate = dense(self.hidden, (self.in_axis, self.hidden_axis), 'gate')(x)  # [..., hidden]
    up = dense(self.hidden, (self.in_axis, self.hidden_axis), 'up')(x)  # [..., hidden]
    # Named so the 'mlp' remat policy can drop (and recompute) exactly these activations.
    hidden = checkpoint_name(nn.silu(gate), 'mlp_hidden') * checkpoint_name(up, 'mlp_hidden')
    return dense(self.out, (self.hidden_axis, self.out_axis), 'down')(hidden)  # [..., out]
