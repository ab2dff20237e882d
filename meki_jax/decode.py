"""Autoregressive decoding with a KV cache: prefill, single-token steps, sampling, generation.

Pure functions over `DecodeTransformer` parameters (`decode_params` makes them from training or
folded `Transformer` parameters). Prompts are right-padded and token t of a row lives in cache
slot t, so rows of different lengths decode together: the prefill writes the first n_b - 1
tokens of row b, and decode step i feeds row b its token at position n_b - 1 + i (the first
step feeds the last prompt token, whose logits give the first new token).

`memory` (a `host_memory.HostMemory`) replaces the folded tables on the device: the parameters
then lack `folded_memory`, and the loop reads each step's rows from the host as soon as it knows
the step's token ids (`HostMemory.prefetch`), overlapping the read with the step's first layers.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from meki_jax.model.attention import init_kv_cache
from meki_jax.model.transformer import check_token_ids, meki_enabled, unstack_layers

PROGRESS_MIN_TOKENS = 8  # generate(progress=True) shows a bar for longer generations


@dataclasses.dataclass(frozen=True)
class Sampling:
  """How a token is chosen from the logits."""
  temperature: float = 0.0  # 0: greedy (argmax)
  top_k: int = 0  # keep the k most likely tokens; 0: all
  top_p: float = 1.0  # keep the fewest most likely tokens whose probability reaches top_p

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f'sampling.temperature={self.temperature} must be >= 0 (0 = greedy)')
    if not (isinstance(self.top_k, int) and self.top_k >= 0):
      raise ValueError(f'sampling.top_k={self.top_k!r} must be an integer >= 0 (0 = off)')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'sampling.top_p={self.top_p} must be in (0, 1] (1 = off)')


def sample_tokens(logits, rng, sampling):
  """logits [batch, vocab] float32 -> token ids [batch] int32.

  Top-k, then top-p over what top-k kept, then a draw at `sampling.temperature`.
  """
  if sampling.temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / sampling.temperature
  if sampling.top_k == 0 and sampling.top_p == 1:
    return jax.random.categorical(rng, logits).astype(jnp.int32)
  values, indices = jax.lax.top_k(logits, sampling.top_k or logits.shape[-1])  # [batch, k]
  if sampling.top_p < 1:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs  # of the strictly more likely tokens
    values = jnp.where(mass_before < sampling.top_p, values, -jnp.inf)
  choice = jax.random.categorical(rng, values)  # [batch], an index into the kept tokens
  return jnp.take_along_axis(indices, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)


def decode_params(params, model_config):
  """Transformer params (training or folded form, boxed or not) -> DecodeTransformer params.

  Every leaf is put on the device (`fold_params` returns numpy tables, which a jitted step
  would otherwise copy to the device on every call).
  """
  return jax.device_put(unstack_layers(nn.meta.unbox(params), model_config.num_layers))


def init_cache(model_config, batch, cache_len):
  """An empty KV cache: per layer (key, value), each [batch, kv_heads, cache_len, head_dim]."""
  return tuple(init_kv_cache(batch, cache_len, model_config.num_kv_heads, model_config.head_dim,
                             jnp.dtype(model_config.dtype))
               for _ in range(model_config.num_layers))


def _memory_rows(memory, token_ids):
  return None if memory is None else memory.device_rows(token_ids)


@functools.partial(jax.jit, static_argnames=('model', 'memory'), donate_argnames=('cache',))
def prefill(model, params, cache, token_ids, start, memory=None):
  """Writes token_ids [batch, seq] into cache slots start .. start + seq - 1; returns the cache."""
  positions = jnp.broadcast_to(start + jnp.arange(token_ids.shape[1]), token_ids.shape)
  _, cache = model.apply({'params': params}, token_ids, positions, cache,
                         memory_rows=_memory_rows(memory, token_ids), with_logits=False)
  return cache


@functools.partial(jax.jit, static_argnames=('model', 'sampling', 'memory'),
                   donate_argnames=('cache',))
def decode_step(model, params, cache, token_ids, positions, rng, sampling, memory=None):
  """One token per row: token_ids, positions [batch] -> (next ids [batch], logits [batch,
  vocab] float32, cache). The token is written to slot `positions` and attends to slots <= it.
  """
  token_ids = token_ids[:, None]  # [batch, 1]
  logits, cache = model.apply({'params': params}, token_ids, positions[:, None], cache,
                              memory_rows=_memory_rows(memory, token_ids))
  logits = logits[:, 0]  # [batch, vocab]
  return sample_tokens(logits, rng, sampling), logits, cache


def prefill_prompt_prefix(model, params, cache, token_ids, chunk_len, memory=None):
  """Writes token_ids [batch, seq] at slots 0.. in chunks of `chunk_len` columns.

  The attention scores of a chunk are [batch, heads, chunk_len, cache_len] float32, so the
  chunk bounds the prefill's memory.
  """
  if chunk_len <= 0:
    raise ValueError(f'prefill chunk_len={chunk_len} must be positive')
  for start in range(0, token_ids.shape[1], chunk_len):
    chunk = np.asarray(token_ids[:, start:start + chunk_len], np.int32)
    if memory is not None:
      memory.prefetch(chunk)
    cache = prefill(model, params, cache, jnp.asarray(chunk), start, memory)
  return cache


def check_prompts(prompts, vocab_size, cache_len, max_new_tokens):
  """Raises ValueError naming the first bad prompt; returns the lengths [batch] int32."""
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens={max_new_tokens} must be >= 1')
  if not prompts:
    raise ValueError('no prompts: pass at least one list of token ids')
  for index, prompt in enumerate(prompts):
    if len(prompt) == 0:
      raise ValueError(f'prompt {index} is empty: decoding needs at least one token')
    check_token_ids(prompt, vocab_size, where=f'prompt {index}')
    if len(prompt) + max_new_tokens > cache_len:
      raise ValueError(f'prompt {index} has {len(prompt)} tokens: with max_new_tokens='
                       f'{max_new_tokens} it needs {len(prompt) + max_new_tokens} cache slots, '
                       f'but cache_len={cache_len}')
  return np.array([len(prompt) for prompt in prompts], np.int32)


def check_memory(model, params, memory):
  """Raises ValueError if the folded tables are neither in `params` nor a matching `memory`."""
  cfg = model.config
  if memory is None:
    if model.folded and meki_enabled(cfg) and 'folded_memory' not in params['layer_0']['meki']:
      raise ValueError('the folded params have no folded_memory tables (they were split off '
                       'for the host): pass memory=<their HostMemory>')
    return
  if not (model.folded and meki_enabled(cfg)):
    raise ValueError('memory (host tables) needs a folded MeKi model: build_model(config.model, '
                     'folded=True, decode=True)')
  expected = (cfg.vocab_size, cfg.num_layers, cfg.meki.d_mem)
  if memory.table.shape != expected:
    raise ValueError(f'host memory table has shape {memory.table.shape}; model.vocab_size, '
                     f'num_layers and meki.d_mem need {expected}')


def right_pad(prompts, lengths):
  """Token id lists -> [batch, max length] int32, padded on the right with id 0."""
  token_ids = np.zeros((len(prompts), int(lengths.max())), np.int32)
  for row, prompt in enumerate(prompts):
    token_ids[row, :len(prompt)] = prompt
  return token_ids


def generate(model, params, prompts, *, max_new_tokens, eod_id=None, cache_len=None,
             sampling=Sampling(), seed=0, memory=None, prefill_chunk_len=512, progress=False):
  """Continues each prompt (a list of token ids) by up to `max_new_tokens` tokens.

  model: `build_model(config.model, folded, decode=True)`; params: `decode_params(...)`.
  A row stops after generating `eod_id` (not returned). cache_len defaults to the longest
  prompt plus max_new_tokens. Returns one list of new token ids per prompt. `progress` shows a
  tqdm bar over the decode steps when more than PROGRESS_MIN_TOKENS are asked for.
  """
  if cache_len is None:
    cache_len = max((len(prompt) for prompt in prompts), default=0) + max_new_tokens
  lengths = check_prompts(prompts, model.config.vocab_size, cache_len, max_new_tokens)
  check_memory(model, params, memory)
  token_ids = right_pad(prompts, lengths)
  cache = init_cache(model.config, len(prompts), cache_len)
  cache = prefill_prompt_prefix(model, params, cache, token_ids[:, :-1], prefill_chunk_len,
                                memory)

  rng = jax.random.PRNGKey(seed)
  rows = np.arange(len(prompts))
  current, positions = token_ids[rows, lengths - 1], lengths - 1  # [batch] each
  if memory is not None:
    memory.prefetch(current[:, None])
  outputs = [[] for _ in prompts]
  done = np.zeros(len(prompts), bool)
  steps = tqdm(range(max_new_tokens), desc='generate', unit='token',
               disable=not progress or max_new_tokens <= PROGRESS_MIN_TOKENS)
  for step in steps:
    next_ids, _, cache = decode_step(model, params, cache, jnp.asarray(current),
                                     jnp.asarray(positions), jax.random.fold_in(rng, step),
                                     sampling, memory)
    next_ids = np.asarray(next_ids)
    for row in rows[~done]:
      if next_ids[row] == eod_id:
        done[row] = True
      else:
        outputs[row].append(int(next_ids[row]))
    if done.all() or step == max_new_tokens - 1:
      break
    if memory is not None:
      memory.prefetch(next_ids[:, None])  # overlaps the next step's dispatch and first layers
    current, positions = next_ids, positions + 1
  steps.close()
  return outputs
