"""Decode speed of MeKi against its dense twin, one run, one backbone, several KV lengths.

  JAX_PLATFORMS=cpu python tools/bench_decode.py --config=configs/meki_0p6b.py --num_layers=8 \
      --kv_lens=1024,4096,10240

Four models share one backbone, the same arrays (random; the speed does not depend on them):
dense (MeKi branch removed), MeKi folded with its tables on the device, MeKi folded with its
tables in a memory-mapped token-major .npy file on the host, and MeKi unfolded (training form).
The dense model also runs a second time as its own competitor: its ratio to the first run is
the noise floor of the measurement (other processes share the CPU).

For each KV length the cache is filled by a real prefill of kv_len - decode_tokens - 1 random
tokens, then each model decodes `decode_tokens` greedy tokens (the first compiles and is not
timed), one jitted step and one host sync per token as in `decode.generate`. The models take
turns token by token, in a random order each round, so load from other processes falls on all
of them; the ratio to dense is the median over rounds of (dense step time / model step time).
tokens/s is given for each model's fastest step (as `timeit` advises: slower steps measure the
other processes, not the code) and for its median step. Bytes/token: the memory rows the MeKi
branch reads (L x d_mem values), and everything a step reads (weights, rows, KV cache), whose
ratio to dense is what a purely memory-bound device would show.
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

import json  # noqa: E402
import os  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import flax.linen as nn  # noqa: E402  (after the platform is chosen)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax import decode, fold, host_memory  # noqa: E402
from meki_jax.config import validate_model  # noqa: E402
from meki_jax.model.transformer import build_model, meki_enabled  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', 'configs/meki_0p6b.py', 'A MeKi config.')
_NUM_LAYERS = flags.DEFINE_integer('num_layers', 8, 'Layers of the backbone (0: the config\'s).')
_KV_LENS = flags.DEFINE_list('kv_lens', ['1024', '4096', '10240'], 'KV cache lengths.')
_DECODE_TOKENS = flags.DEFINE_integer('decode_tokens', 40, 'Tokens per model and KV length.')
_BATCH = flags.DEFINE_integer('batch', 1, 'Sequences decoded together.')
_PREFILL_CHUNK = flags.DEFINE_integer('prefill_chunk', 512, 'Prefill chunk length.')
_DTYPE = flags.DEFINE_string('dtype', 'float32', 'Compute dtype (CPUs lack fast bf16 matmuls).')
_SEED = flags.DEFINE_integer('seed', 0, 'Parameter and prompt seed.')
_TIMES_JSON = flags.DEFINE_string('times_json', None, 'Also write every step time (s) here.')

TABLE_NAMES = ('folded_memory', 'memory_table')  # read one row per token, not whole


def _on_backbone(params, backbone):
  """Decode params whose every entry but the MeKi branches is `backbone`'s (the same arrays)."""
  shared = dict(backbone)
  for name, entry in params.items():
    if 'meki' in entry:
      shared[name] = {**backbone[name], 'meki': entry['meki']}
  return shared


def _models(config):
  """name -> (DecodeTransformer, decode params, HostMemory or None), on one backbone."""
  model = build_model(config)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(_SEED.value),
                                             jnp.zeros((1, 1), jnp.int32))['params'])
  folded = fold.fold_params(params, config)
  stripped, tables = host_memory.split_folded_tables(folded)
  memory_file = os.path.join(tempfile.mkdtemp(prefix='bench_decode_'), 'memory.npy')
  memory = host_memory.write_host_memory(tables, memory_file)
  dense_config = config.copy_and_resolve_references()
  dense_config.meki.enabled = False
  dense = {**params, 'layers': {k: v for k, v in params['layers'].items() if k != 'meki'}}
  backbone = decode.decode_params(dense, config)
  dense_model = (build_model(dense_config, decode=True), backbone, None)
  meki = lambda params: _on_backbone(decode.decode_params(params, config), backbone)
  return {
      'dense': dense_model,
      'dense, again (noise floor)': dense_model,
      'meki folded': (build_model(config, folded=True, decode=True), meki(folded), None),
      'meki folded, host tables': (build_model(config, folded=True, decode=True), meki(stripped),
                                   memory),
      'meki unfolded': (build_model(config, decode=True), meki(params), None),
  }, memory_file


def _bytes_per_token(params, memory, config, kv_len, batch):
  """(memory-row bytes, all bytes) one decode step reads per token: weights once, rows, KV."""
  meki = 'meki' in params['layer_0']
  row_bytes = 0
  if meki:
    itemsize = (memory.table.dtype if memory else jnp.dtype(config.param_dtype)).itemsize
    row_bytes = config.num_layers * config.meki.d_mem * itemsize
  weights = sum(leaf.nbytes for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if getattr(path[-1], 'key', None) not in TABLE_NAMES)
  kv = 2 * config.num_layers * kv_len * config.num_kv_heads * config.head_dim * jnp.dtype(
      config.dtype).itemsize * batch
  return row_bytes, (weights + kv) / batch + row_bytes


class _Decoder:
  """One model's greedy decoding from its own copy of a prefilled cache, one token per call."""

  def __init__(self, model, params, memory, cache, start_ids, position):
    self.model, self.params, self.memory = model, params, memory
    self.cache = jax.tree_util.tree_map(jnp.copy, cache)
    self.current, self.positions = np.asarray(start_ids), jnp.full(len(start_ids), position)

  def step(self):
    """Seconds for one decode step with the host work of a `decode.generate` step: the sync
    for the token ids and, with host tables, starting the read of the next step's rows."""
    begin = time.perf_counter()
    if self.memory is not None:
      self.memory.prefetch(self.current[:, None])
    next_ids, _, self.cache = decode.decode_step(
        self.model, self.params, self.cache, jnp.asarray(self.current), self.positions,
        jax.random.PRNGKey(0), decode.Sampling(), self.memory)
    self.current = np.asarray(next_ids)
    seconds = time.perf_counter() - begin
    self.positions = self.positions + 1
    return seconds


def main(argv):
  del argv
  config = _CONFIG.value.model
  if _NUM_LAYERS.value:
    config.num_layers = _NUM_LAYERS.value
  config.dtype = _DTYPE.value
  config.remat_policy = 'none'
  validate_model(config)
  if not meki_enabled(config):
    raise ValueError(f'--config has model.meki.d_mem={config.meki.d_mem}: the benchmark needs a '
                     'MeKi config (its dense twin is derived from it)')
  if _TIMES_JSON.value and os.path.exists(_TIMES_JSON.value):
    raise FileExistsError(f'--times_json={_TIMES_JSON.value} exists; choose a new path')
  models, memory_file = _models(config)
  batch, steps = _BATCH.value, _DECODE_TOKENS.value
  print(f'backbone: {config.num_layers} layers, d_model {config.d_model}, heads '
        f'{config.num_heads}/{config.num_kv_heads}, d_ff {config.d_ff}, d_mem '
        f'{config.meki.d_mem}, vocab {config.vocab_size}, {config.dtype}; batch {batch}; '
        f'{steps} tokens per model; host tables: {memory_file}; '
        f'{jax.devices()[0].device_kind} x {os.cpu_count()} cores', flush=True)
  print('| KV length | model | tokens/s | (median) | vs dense | memory rows B/token '
        '| all B/token | vs dense (bytes) |')
  print('|---|---|---|---|---|---|---|---|')
  rng = np.random.default_rng(_SEED.value)
  times = {}
  for kv_len in (int(length) for length in _KV_LENS.value):
    prompt_len = kv_len - steps
    if prompt_len < 2 or steps < 2:
      raise ValueError(f'--kv_lens entry {kv_len} must exceed --decode_tokens={steps} + 1, '
                       'which must be >= 2')
    prompt = rng.integers(0, config.vocab_size, (batch, prompt_len), dtype=np.int32)
    caches = {}
    for name in ('dense', 'meki folded'):  # the host and unfolded forms compute this cache too
      model, params, memory = models[name]
      cache = decode.init_cache(model.config, batch, kv_len)
      caches[name] = jax.block_until_ready(decode.prefill_prompt_prefix(
          model, params, cache, prompt[:, :-1], _PREFILL_CHUNK.value, memory))
    decoders = {name: _Decoder(model, params, memory,
                               caches['meki folded' if 'meki' in name else 'dense'],
                               prompt[:, -1], prompt_len - 1)
                for name, (model, params, memory) in models.items()}
    del caches
    for decoder in decoders.values():
      decoder.step()  # compiles
    seconds = {name: [] for name in models}
    for _ in range(steps - 1):  # models alternate token by token, in a new order each round
      for name in rng.permutation(list(models)):
        seconds[name].append(decoders[name].step())
    del decoders
    dense_bytes = _bytes_per_token(models['dense'][1], None, config, kv_len, batch)[1]
    if _TIMES_JSON.value:
      times[kv_len] = seconds
    for name, (model, params, memory) in models.items():
      best, median = batch / np.min(seconds[name]), batch / np.median(seconds[name])
      ratio = np.median(np.array(seconds['dense']) / np.array(seconds[name]))
      row_bytes, all_bytes = _bytes_per_token(params, memory, config, kv_len, batch)
      print(f'| {kv_len} | {name} | {best:.2f} | {median:.2f} | {ratio:.3f} | {row_bytes:,} | '
            f'{all_bytes / 1e6:,.1f} MB | {dense_bytes / all_bytes:.3f} |', flush=True)
  if _TIMES_JSON.value:
    temporary = f'{_TIMES_JSON.value}.{os.getpid()}.tmp'
    with open(temporary, 'w', encoding='utf-8') as out:
      json.dump(times, out)
    os.replace(temporary, _TIMES_JSON.value)
  models['meki folded, host tables'][2].close()
  os.remove(memory_file)
  os.rmdir(os.path.dirname(memory_file))


if __name__ == '__main__':
  cli.run_absl(main)
