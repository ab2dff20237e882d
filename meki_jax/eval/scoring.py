"""A checkpoint on the mesh, and the log-probabilities it gives tokens.

`restore_eval_model(config, checkpoint)` reads a checkpoint's parameters, folds them (the
inference form, the default) and places them on the run's mesh with its sharding rules;
`score_continuations` turns (context, continuation) token lists into summed log-probabilities
with one jitted forward pass per batch. Batches are padded to a fixed number of rows and to
power-of-two lengths, so a whole evaluation compiles a handful of programs.
"""

import dataclasses
import functools
import importlib.util
import math
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meki_jax import fold, run_config, sharding
from meki_jax.config import validate
from meki_jax.export.exporter import checkpoint_step_dir, restore_params
from meki_jax.model.transformer import build_model, check_token_ids

MIN_BUCKET = 16  # shortest padded length: below it a recompile costs more than the padding


def load_config(checkpoint, config_file=None):
  """The run's validated config: <workdir>/config.json (the trainer writes it), or
  `config_file` ('configs/X.py[:arg]', what --config gives the command lines) if given.

  checkpoint: a workdir or <workdir>/checkpoints/<step>.
  """
  if config_file is None:
    return validate(run_config.load(checkpoint_step_dir(checkpoint).parent.parent))
  path, _, arg = config_file.partition(':')
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config={config_file!r}: no such file {path!r}')
  spec = importlib.util.spec_from_file_location('meki_jax_eval_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg or None)
  config.lock()
  return validate(config)


@dataclasses.dataclass(frozen=True)
class EvalModel:
  """A Transformer and its parameters on `mesh`; batch rows shard as the rules map 'batch'."""
  config: object  # the run's ConfigDict
  model: nn.Module  # build_model(config.model, folded)
  params: dict  # unboxed, sharded by the parameters' logical axes
  mesh: jax.sharding.Mesh
  rules: tuple  # logical axis rules
  step: int | None = None  # the checkpoint's step

  @property
  def batch_sharding(self):
    """Where a [batch, seq] array goes: rows over the mesh axes 'batch' maps to."""
    return jax.sharding.NamedSharding(
        self.mesh, nn.logical_to_mesh_axes(('batch', 'length'), self.rules))

  @property
  def batch_multiple(self):
    """The number of row shards; a batch's row count must be a multiple of it."""
    axes = self.batch_sharding.spec[0]
    axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
    return math.prod(self.mesh.shape[axis] for axis in axes)

  def put_batch(self, array):
    """A host array [rows, seq] -> on the mesh, rows padded with zeros to `batch_multiple`."""
    array = np.asarray(array)
    missing = -len(array) % self.batch_multiple
    array = np.pad(array, [(0, missing)] + [(0, 0)] * (array.ndim - 1))
    return jax.device_put(array, self.batch_sharding)


def place_params(config, params, folded, step=None):
  """An EvalModel of unboxed params (training or folded form) on the run's mesh."""
  model = build_model(config.model, folded=folded)
  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.mesh)
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
  shardings = sharding.logical_shardings(abstract['params'], mesh, rules)
  sharding.check_divisible(nn.meta.unbox(abstract['params']), shardings)
  params = jax.device_put(nn.meta.unbox(params), shardings)
  return EvalModel(config, model, params, mesh, rules, step)


def restore_eval_model(config, checkpoint, folded=True):
  """An EvalModel of a checkpoint: a workdir (its latest step) or <workdir>/checkpoints/<step>."""
  params, step = restore_params(config, checkpoint)
  if folded:
    params = fold.fold_params(params, config.model)
  return place_params(config, params, folded, step)


@functools.partial(jax.jit, static_argnames=('model',))
def _target_logprobs(model, params, inputs, targets):
  """inputs, targets [batch, seq] -> (log p(target) [batch, seq], target is the argmax)."""
  logits = model.apply({'params': params}, inputs)  # [batch, seq, vocab] float32
  target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  logprobs = target_logits - jax.nn.logsumexp(logits, axis=-1)  # = log_softmax, gathered
  return logprobs, jnp.argmax(logits, axis=-1) == targets


def token_logprobs(eval_model, inputs, targets):
  """Host arrays inputs, targets [batch, seq] -> (logprobs [batch, seq] float32, is_argmax bool).

  Right padding is harmless: attention is causal, so a token never sees the padding after it.
  """
  with jax.set_mesh(eval_model.mesh), nn.logical_axis_rules(eval_model.rules):
    logprobs, greedy = _target_logprobs(eval_model.model, eval_model.params,
                                        eval_model.put_batch(inputs), eval_model.put_batch(targets))
  return np.asarray(logprobs)[:len(inputs)], np.asarray(greedy)[:len(inputs)]


def bucket_length(length, max_length):
  """The padded length of a batch whose longest row has `length` tokens."""
  return min(max(MIN_BUCKET, 1 << (length - 1).bit_length()), max_length)


def score_continuations(eval_model, pairs, *, batch_size, max_length, progress=None):
  """[(context ids, continuation ids)] -> [(sum of log p(continuation), is_greedy)].

  Context + continuation is cut from the left to its last max_length + 1 tokens (the first is
  only conditioned on); a continuation longer than max_length keeps its last max_length tokens.
  is_greedy: every continuation token is the argmax of its prediction. Rows are batched longest
  first, `batch_size` rows per forward pass; `progress(rows)` is called after each batch.
  """
  rows = []
  for index, (context, continuation) in enumerate(pairs):
    if not context or not continuation:
      raise ValueError(f'request {index}: context ({len(context)} tokens) and continuation '
                       f'({len(continuation)} tokens) must both be non-empty')
    tokens = (list(context) + list(continuation))[-(max_length + 1):]
    check_token_ids(tokens, eval_model.config.model.vocab_size, where=f'request {index}')
    rows.append((tokens, min(len(continuation), len(tokens) - 1)))
  order = sorted(range(len(rows)), key=lambda index: -len(rows[index][0]))
  results = [None] * len(rows)
  for start in range(0, len(order), batch_size):
    batch = order[start:start + batch_size]
    seq_len = bucket_length(len(rows[batch[0]][0]) - 1, max_length)
    inputs = np.zeros((batch_size, seq_len), np.int32)
    targets = np.zeros((batch_size, seq_len), np.int32)
    for row, index in enumerate(batch):
      tokens = rows[index][0]
      inputs[row, :len(tokens) - 1], targets[row, :len(tokens) - 1] = tokens[:-1], tokens[1:]
    logprobs, greedy = token_logprobs(eval_model, inputs, targets)
    for row, index in enumerate(batch):
      end = len(rows[index][0]) - 1
      scored = slice(end - rows[index][1], end)  # the continuation's predictions
      results[index] = (float(np.sum(logprobs[row, scored], dtype=np.float64)),
                        bool(greedy[row, scored].all()))
    if progress is not None:
      progress(len(batch))
  return results
