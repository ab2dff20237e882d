"""Validation of a run's ConfigDict: every error names the field and its value."""

from meki_jax.data.packing import PACKINGS
from meki_jax.model.attention import ATTENTION_IMPLEMENTATIONS
from meki_jax.model.engram import hash_moduli
from meki_jax.model.meki import FLAVORS, FUSIONS, MEMORIES, MEMORY_MIXES, POSITIONS, PROJECTIONS
from meki_jax.model.remat import OFFLOADABLE, REMAT_POLICIES, offloadable_names

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


def _validate_ple(model):
  ple = model.ple
  _require(isinstance(ple.enabled, bool), f'model.ple.enabled={ple.enabled!r} must be a bool')
  if ple.enabled:
    _positive('model.ple', 'd_ple', ple.d_ple)


def _distinct_ints(section, name, values, low, high=None):
  """A non-empty sequence of distinct integers >= low (and < high when given)."""
  in_range = lambda v: (isinstance(v, int) and not isinstance(v, bool) and v >= low and
                        (high is None or v < high))
  _require(isinstance(values, (list, tuple)) and len(values) > 0 and all(map(in_range, values))
           and len(set(values)) == len(values),
           f'{section}.{name}={values!r} must be a non-empty list of distinct integers >= {low}'
           + ('' if high is None else f' and < {high}'))


def _validate_engram(model):
  engram = model.engram
  _require(isinstance(engram.enabled, bool),
           f'model.engram.enabled={engram.enabled!r} must be a bool')
  if not engram.enabled:
    return
  _distinct_ints('model.engram', 'layers', engram.layers, 0, model.num_layers)
  _distinct_ints('model.engram', 'ngram_orders', engram.ngram_orders, 2)
  for name in ('num_heads', 'head_width', 'rows_per_head', 'conv_kernel'):
    _positive('model.engram', name, engram[name])
  _require(isinstance(engram.seed, int) and engram.seed >= 0,
           f'model.engram.seed={engram.seed!r} must be an integer >= 0')
  heads = len(engram.ngram_orders) * engram.num_heads
  _require(heads * engram.rows_per_head < 2 ** 31,
           f'model.engram.rows_per_head={engram.rows_per_head} x {heads} heads (ngram_orders x '
           'num_heads) rows do not fit int32 row ids')
  try:
    hash_moduli(engram)
  except ValueError as error:
    raise ConfigError(str(error)) from error


def _validate_remat_offload(model):
  offload = model.remat_offload
  _require(isinstance(offload, (list, tuple)) and len(set(offload)) == len(offload)
           and all(name in OFFLOADABLE for name in offload),
           f'model.remat_offload={offload!r} must be a tuple of distinct names from '
           f'{OFFLOADABLE}')
  if offload:
    _require(model.remat_policy != 'none', f'model.remat_offload={tuple(offload)!r} needs a '
             "remat policy: model.remat_policy='none' keeps every activation in HBM")
    allowed = offloadable_names(model)
    for name in offload:
      _require(name in allowed, f'model.remat_offload={tuple(offload)!r}: '
               f'model.remat_policy={model.remat_policy!r} does not keep {name!r} (with '
               f'model.qk_norm={model.qk_norm}); it keeps {allowed}')
    _require('context' not in offload or model.attention in ('xla', 'blocked'),
             f'model.remat_offload={tuple(offload)!r}: with model.attention='
             f"{model.attention!r} (the splash kernel on TPU) jax runs the kernel's forward "
             "again instead of bringing its offloaded context back; keep 'context' in HBM")


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
  _validate_remat_offload(model)
  _choice('model', 'attention', model.attention, ATTENTION_IMPLEMENTATIONS)
  _positive('model', 'attention_block', model.attention_block)
  _require(isinstance(model.loss_chunk_len, int) and model.loss_chunk_len >= 0,
           f'model.loss_chunk_len={model.loss_chunk_len!r} must be an integer >= 0 '
           '(0 = the whole sequence)')
  _choice('model', 'flavor', model.get('flavor', 'paper'), FLAVORS)
  _choice('model', 'memory_mix', model.memory_mix, MEMORY_MIXES)
  _require(isinstance(model.weight_grad_first, bool),
           f'model.weight_grad_first={model.weight_grad_first!r} must be True or False')
  meki = model.meki
  _require(isinstance(meki.d_mem, int) and meki.d_mem >= 0,
           f'model.meki.d_mem={meki.d_mem!r} must be an integer >= 0 (0 = dense baseline)')
  _choice('model.meki', 'memory', meki.memory, MEMORIES)
  _choice('model.meki', 'fusion', meki.fusion, FUSIONS)
  _choice('model.meki', 'position', meki.position, POSITIONS)
  _choice('model.meki', 'projection', meki.projection, PROJECTIONS)
  _require(meki.projection == 'linear' or meki.memory == 'static' or model.d_model % 2 == 0,
           f'model.d_model={model.d_model} must be even for the SwiGLU projection (d -> d/2)')
  if model.get('flavor', 'paper') == 'authors_release':  # spec section 6a
    _require(not model.qk_norm, 'model.flavor=authors_release has no q/k RMSNorm (spec 6a point '
             '4) but model.qk_norm=True; select the flavor with the config argument '
             '`:flavor=authors_release`, which sets both')
    _require(not meki.enabled or meki.position == 'parallel_ffn',
             f'model.flavor=authors_release: model.meki.position={meki.position!r}, but the '
             "authors' released code has the MeKi branch parallel to the FFN only ('parallel_ffn')")
  if 'ple' in model:
    _validate_ple(model)
  if 'engram' in model:
    _validate_engram(model)
  return model


_SOURCES_SYNTAX = ('--config.data.train_sources=\'({"path": "shards/*.array_record", '
                   '"weight": 1.0},)\'')


def _validate_sources(name, sources):
  """Each source is a dict with a string `path` (and optionally a positive `weight`)."""
  _require(isinstance(sources, (list, tuple)),
           f'data.{name}={sources!r} must be a tuple of dicts, e.g. {_SOURCES_SYNTAX}')
  for number, source in enumerate(sources):
    _require(hasattr(source, 'get') and isinstance(source.get('path'), str),
             f'data.{name}[{number}]={source!r} must be a dict with a string "path", e.g. '
             f'{_SOURCES_SYNTAX}')
    weight = source.get('weight', 1.0)
    _require(isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight > 0,
             f'data.{name}[{number}] weight={weight!r} must be a positive number')


def validate(config):
  """Checks a whole run config (model, data, train, optim); returns it unchanged."""
  validate_model(config.model)
  if 'data' in config:
    _require('mask_eod_target' not in config.data,
             f'data.mask_eod_target={config.data.get("mask_eod_target")!r} was removed: it took '
             'the loss off the EOD targets, so models never learned to end a document. Use '
             'data.mask_eod_input (default True, Megatron\'s --eod-mask-loss: no loss where the '
             'INPUT is EOD; spec section 6)')
    _positive('data', 'seq_len', config.data.seq_len)
    _choice('data', 'packing', config.data.packing, PACKINGS)
    seq_len, model = config.data.seq_len, config.model
    for name in ('attention_block', 'loss_chunk_len'):
      chunk = model[name]
      _require(chunk == 0 or seq_len <= chunk or seq_len % chunk == 0,
               f'data.seq_len={seq_len} is not a multiple of model.{name}={chunk}')
    _require(0 <= config.data.eod_id < config.model.vocab_size,
             f'data.eod_id={config.data.eod_id} is outside the vocabulary '
             f'[0, model.vocab_size={config.model.vocab_size})')
    _require(0 <= config.data.eval_fraction < 1,
             f'data.eval_fraction={config.data.eval_fraction} must lie in [0, 1)')
    _require(config.data.eval_sources or config.data.eval_fraction > 0,
             'data.eval_sources is empty and data.eval_fraction=0: no data to evaluate on')
    _require(len(config.data.train_sources) > 0, 'data.train_sources is empty')
    for name in ('train_sources', 'eval_sources'):
      _validate_sources(name, config.data[name])
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
    for name in ('params_on_host', 'opt_state_on_host'):
      _require(isinstance(optim[name], bool), f'optim.{name}={optim[name]!r} must be True or False')
  return config
