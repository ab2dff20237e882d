"""AdamW with global-norm clipping and a warm-up + cosine schedule (spec section 6).

Weight decay skips parameters whose last path component is `scale` (RMSNorm gains), `alpha` or
`beta` (MeKi's scalar magnitudes): decaying them pulls gains towards 0 rather than regularising
a mapping, which shrinks activations instead of weights. Kernels, the embedding and the memory
tables are decayed. The authors_release flavor (spec 6a point 5) decays alpha and beta too:
Megatron exempts only 1-D parameters (the gains), and its scalars are 0-D.
"""

import jax
import jax.numpy as jnp
import optax

NO_DECAY_NAMES = {'paper': ('scale', 'alpha', 'beta'), 'authors_release': ('scale',)}


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


def decay_mask(params, flavor='paper'):
  """True for leaves that get weight decay under a model flavor (see the module docstring)."""
  if flavor not in NO_DECAY_NAMES:
    raise ValueError(f'model.flavor={flavor!r} is not one of {tuple(NO_DECAY_NAMES)}')
  def decays(path, _):
    last = path[-1]
    name = getattr(last, 'key', getattr(last, 'name', str(last)))
    return name not in NO_DECAY_NAMES[flavor]
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_config, num_steps, flavor='paper'):
  """optax: clip_by_global_norm(clip_norm) then AdamW(schedule, b1, b2, eps, weight_decay).

  `flavor` (config.model.flavor) selects the weight-decay mask; it shapes the optimizer state,
  so a checkpoint restores only into the optimizer of its own flavor.
  """
  return optax.chain(
      optax.clip_by_global_norm(optim_config.clip_norm),
      optax.adamw(learning_rate_schedule(optim_config, num_steps), b1=optim_config.b1,
                  b2=optim_config.b2, eps=optim_config.eps,
                  weight_decay=optim_config.weight_decay,
                  mask=lambda params: decay_mask(params, flavor)))
