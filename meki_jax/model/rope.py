"""Rotary position embedding (RoPE), Qwen3 layout: the two halves of head_dim are rotated."""

import jax.numpy as jnp


def apply_rope(x, positions, theta):
  """Rotates x by its positions.

  x: [batch, seq, heads, head_dim]; positions: [batch, seq] int. Returns x's shape and dtype.
  """
  head_dim = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [batch, seq, head_dim / 2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [batch, seq, 1, head_dim]
  first, second = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([-second, first], axis=-1)
  return (x * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)
