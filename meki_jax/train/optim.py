"""AdamW with global-norm clipping and a warm-up + cosine schedule (spec section 6).

Weight decay skips parameters whose last path component is `scale` (RMSNorm gains), `alpha` or
`beta` (MeKi's scalar magnitudes): decaying them pulls gains towards 0 rather than regularising
a mapping, which shrinks activations instead of weights. Kernels, the embedding and the memory
tables are decayed.
"""

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = ('scale', 'alpha', 'beta')


def learning_rate_schedule(optim_config, num_steps):
  """Linear warm-up 0 -> peak_lr over warmup_steps, then cosine peak_lr -> end_lr at num_steps."""
  warmup = optim_config.warmup_steps
  decay_steps = max(num_steps - warmup, 1)

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    warm = optim_config.peak_lr * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    cosine = optim_config.end_lr + 0.5 * (optim_config.peak_lr - optim_config.end_lr) * (
        1 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, warm, cosine)

  return schedule


def decay_mask(params):
  """True for leaves that get weight decay (see the module docstring)."""
  def decays(path, _):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', str(last)))
    return name not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config, num_steps):
  """optax: clip_by_global_norm(clip_norm) then AdamW(schedule, b1, b2, eps, weight_decay)."""
  return optax.chain(
      optax.clip_by_global_norm(optim_config.clip_norm),
      optax.adamw(learning_rate_schedule(optim_config, num_steps), b1=optim_config.b1,
                  b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay, mask=decay_mask))
