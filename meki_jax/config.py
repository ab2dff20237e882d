"""Validation of a run's ConfigDict: every error names the field and its value."""

from meki_jax.model.meki import FUSIONS, MEMORIES, POSITIONS, PROJECTIONS
from meki_jax.model.transformer import REMAT_POLICIES

DTYPES = ('float32', 'bfloat16', 'float16')


class ConfigError(ValueError):
  """A config field holds a value that cannot work."""


def _require(condition, message):
  if not condition:
    raise ConfigError(message)


def _positive(section, name, value):
  _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
           f'{section}.{name}={value!r} must be a positive integer')


def _choice(section, name, value, choices):
  _require(value in choices, f'{section}.{name}={value!r} is not one of {tuple(choices)}')


def validate_model(model):
  """Checks `config.model` (shapes, variant names, dtypes); returns it unchanged."""
  for name in ('vocab_size', 'num_layers', 'd_model', 'num_heads', 'num_kv_heads', 'head_dim',
               'd_ff'):
    _positive('model', name, model[name])
  _require(model.num_heads % model.num_kv_heads == 0,
           f'model.num_heads={model.num_heads} is not divisible by '
           f'model.num_kv_heads={model.num_kv_heads}')
  _require(model.head_dim % 2 == 0, f'model.head_dim={model.head_dim} must be even for RoPE')
  _require(model.rope_theta > 0, f'model.rope_theta={model.rope_theta} must be positive')
  _require(model.norm_eps > 0, f'model.norm_eps={model.norm_eps} must be positive')
  _require(model.init_std > 0, f'model.init_std={model.init_std} must be positive')
  _choice('model', 'dtype', model.dtype, DTYPES)
  _choice('model', 'param_dtype', model.param_dtype, DTYPES)
  _choice('model', 'remat_policy', model.remat_policy, REMAT_POLICIES)
  meki = model.meki
  _require(isinstance(meki.d_mem, int) and meki.d_mem >= 0,
           f'model.meki.d_mem={meki.d_mem!r} must be an integer >= 0 (0 = dense baseline)')
  _choice('model.meki', 'memory', meki.memory, MEMORIES)
  _choice('model.meki', 'fusion', meki.fusion, FUSIONS)
  _choice('model.meki', 'position', meki.position, POSITIONS)
  _choice('model.meki', 'projection', meki.projection, PROJECTIONS)
  _require(meki.projection == 'linear' or meki.memory == 'static' or model.d_model % 2 == 0,
           f'model.d_model={model.d_model} must be even for the SwiGLU projection (d -> d/2)')
  return model


def validate(config):
  """Checks a whole run config (model, data, train, optim); returns it unchanged."""
  validate_model(config.model)
  if 'data' in config:
    _positive('data', 'seq_len', config.data.seq_len)
    _require(0 <= config.data.eod_id < config.model.vocab_size,
             f'data.eod_id={config.data.eod_id} is outside the vocabulary '
             f'[0, model.vocab_size={config.model.vocab_size})')
  if 'train' in config:
    train = config.train
    for name in ('num_steps', 'global_batch_size', 'grad_accum_steps', 'log_every',
                 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
      _positive('train', name, train[name])
    _require(train.global_batch_size % train.grad_accum_steps == 0,
             f'train.global_batch_size={train.global_batch_size} is not divisible by '
             f'train.grad_accum_steps={train.grad_accum_steps}')
  if 'optim' in config:
    optim = config.optim
    _require(optim.peak_lr > 0, f'optim.peak_lr={optim.peak_lr} must be positive')
    _require(0 <= optim.end_lr <= optim.peak_lr,
             f'optim.end_lr={optim.end_lr} must lie in [0, optim.peak_lr={optim.peak_lr}]')
    _require(optim.warmup_steps >= 0, f'optim.warmup_steps={optim.warmup_steps} must be >= 0')
    _require(optim.schedule_steps == -1 or optim.schedule_steps > 0,
             f'optim.schedule_steps={optim.schedule_steps} must be positive or -1')
    _require(0 <= optim.b1 < 1 and 0 <= optim.b2 < 1,
             f'optim.b1={optim.b1}, optim.b2={optim.b2} must lie in [0, 1)')
    _require(optim.weight_decay >= 0, f'optim.weight_decay={optim.weight_decay} must be >= 0')
    _require(optim.clip_norm > 0, f'optim.clip_norm={optim.clip_norm} must be positive')
  return config
