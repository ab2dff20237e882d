"""The training loop: config -> mesh -> data -> sharded state -> jitted steps -> checkpoints.

`train(config, workdir)` takes the workdir's lock (trainer.lock), checks everything it can
before step 1 (the config against <workdir>/config.json and against the resumed step's own
record, that the training sources hold documents and the evaluation data loss tokens), resumes
from the newest checkpoint that passes its checksums (state, optimizer, step and the data
iterator's position; damaged newer steps are moved to <workdir>/damaged_checkpoints), logs
every `train.log_every` global steps, evaluates every `train.eval_every`, saves every
`train.checkpoint_every` (each step records the run's config; run_config.py), and on SIGTERM (a
TPU preemption) or a first Ctrl-C saves the current step and returns. Before the loop starts a
Ctrl-C exits at once (interrupt.py): nothing has been trained that a save would keep. A
non-finite loss or state, or a failed save, stops the run with a RunError before anything bad
is saved.
"""

import functools
import sys
import time

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from tqdm import tqdm

from meki_jax import files, interrupt, run_config, sharding
from meki_jax.config import validate
from meki_jax.convert.hf_qwen3 import load_hf_qwen3, merge_backbone
from meki_jax.data.pipeline import make_eval_dataset, make_train_dataset
from meki_jax.model.transformer import build_model, check_token_ids
from meki_jax.train import checkpoint, flops, optim, state as state_lib, step as step_lib
from meki_jax.train.errors import RunError
from meki_jax.train.lock import workdir_lock
from meki_jax.train.metrics import MetricWriter


class _Preemption:
  """Whether to save and stop after this step, the same answer on every process.

  One process: SIGTERM and a first Ctrl-C request it (interrupt.Deferred); a second Ctrl-C exits
  at once (status 130) without saving. Several: jax.distributed's preemption service (started by
  jax.distributed.initialize) catches SIGTERM on any host and orbax's `reached_preemption`
  makes all processes agree on the step, so no handler of ours replaces the service's (Ctrl-C
  exits at once, as before the first step).
  """

  def __init__(self, manager):
    self._manager = manager
    self._deferred = None
    if jax.process_count() == 1:
      self._deferred = interrupt.Deferred(
          'Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again to exit at '
          'once without saving)', 'second Ctrl-C: exiting without saving')

  def reached(self, step):
    if self._deferred is not None:
      return self._deferred.requested
    return self._manager.reached_preemption(step)

  def restore(self):
    if self._deferred is not None:
      self._deferred.close()


def _global_batch(local_batch, batch_sharding, vocab_size):
  check_token_ids(local_batch['inputs'], vocab_size, where='batch inputs')
  check_token_ids(local_batch['targets'], vocab_size, where='batch targets')
  return {key: jax.make_array_from_process_local_data(batch_sharding, local_batch[key])
          for key in step_lib.BATCH_KEYS}


def _start_from_hf(state, state_shardings, config):
  """Replaces the fresh backbone with a Hugging Face Qwen3 checkpoint's (MeKi keeps its init)."""
  backbone = load_hf_qwen3(config.train.init_from_hf, config.model)
  params = merge_backbone(jax.device_get(state.params), backbone)
  return state.replace(params=jax.device_put(params, state_shardings.params))


def evaluate(params, config, eval_fn, batch_sharding):
  """Mean loss over up to `train.eval_batches` held-out batches."""
  dataset = make_eval_dataset(config.data, global_batch_size=config.train.global_batch_size,
                              process_index=jax.process_index(),
                              process_count=jax.process_count())
  loss_sum, count = 0.0, 0.0
  for number, local_batch in enumerate(dataset):
    if number == config.train.eval_batches:
      break
    batch = _global_batch(local_batch, batch_sharding, config.model.vocab_size)
    batch_loss, batch_count = eval_fn(params, batch)
    loss_sum, count = loss_sum + float(batch_loss), count + float(batch_count)
  if count == 0:
    raise ValueError(_no_eval_tokens(config.data))
  return loss_sum / count


def _no_eval_tokens(data_config):
  """Why there is nothing to evaluate on, naming the sources."""
  if data_config.eval_sources:
    paths = ', '.join(repr(source['path']) for source in data_config.eval_sources)
    return (f'the evaluation data has no loss tokens: data.eval_sources ({paths}) hold no '
            'document of two or more tokens; point them at token shards with documents')
  return ('the evaluation data has no loss tokens: set data.eval_sources, or a '
          f'data.eval_fraction (now {data_config.eval_fraction}) that holds out some documents '
          'of data.train_sources')


def check_eval_data(config):
  """Fails before step 1 unless the first `train.eval_batches` evaluation batches hold loss
  tokens (every process packs the same global batches, so each checks all of them)."""
  dataset = make_eval_dataset(config.data, global_batch_size=config.train.global_batch_size)
  for number, batch in enumerate(dataset):
    if number == config.train.eval_batches:
      break
    if batch['loss_mask'].sum() > 0:
      return
  raise ValueError(_no_eval_tokens(config.data))


def _check_finite(state, step, manager):
  """RunError naming the parameters or moments that hold NaN/inf; nothing is saved then."""
  bad = checkpoint.nonfinite_leaves(state)
  if bad:
    raise RunError(f'step {step}: NaN or inf in {", ".join(bad[:5])}'
                   f'{" ..." if len(bad) > 5 else ""}; training stopped without saving. '
                   + _resume_hint(manager))


def _resume_hint(manager):
  steps = checkpoint.saved_steps(str(manager.directory))
  return (f'The newest checkpoint is step {steps[-1]}; resume from it with a lower '
          'optim.peak_lr or a larger optim.warmup_steps' if steps else 'There is no checkpoint.')


def train(config, workdir):
  """Trains until `train.num_steps`, SIGTERM or Ctrl-C. Returns the last logged metrics."""
  config = validate(config)
  files.check_bucket(workdir)  # a gs:// workdir's bucket must exist: it is never created
  recorded = run_config.check(config, workdir)  # before anything is read or written
  lock = workdir_lock(workdir, jax.process_count())
  if jax.process_index() == 0:
    lock.acquire()
  try:
    with interrupt.cleanup(lock.release):
      return _train(config, workdir, recorded)
  finally:
    lock.release()


def _resumed_record(config, workdir, step, recorded):
  """The record of a run resuming checkpoint `step` (run_config.record), after refusing a
  different model (the step's own record decides, with or without <workdir>/config.json) and
  listing the other settings that changed since the step was saved."""
  step_record, changes = run_config.check_checkpoint(
      config, checkpoint.checkpoint_directory(workdir) / str(step))
  if changes:
    _print(f'resuming checkpoint step {step} with changed settings: ' + '; '.join(changes))
  if config.train.init_from_hf:
    _print(f'{run_config.INIT_FROM_HF}={config.train.init_from_hf!r} is ignored: the run resumes '
           f'from checkpoint step {step} of {workdir} (it only initialises a new run)')
  return run_config.record(config, step_record or recorded or {})


def _train(config, workdir, recorded):
  train_config = config.train
  make_data = lambda seed: iter(make_train_dataset(
      config.data, global_batch_size=train_config.global_batch_size,
      process_index=jax.process_index(), process_count=jax.process_count(), seed=seed))
  data_iterator = make_data(config.data.shuffle_seed)  # fails on sources without documents
  check_eval_data(config)

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.axis_rules(config.mesh)
  model = build_model(config.model)
  schedule_steps = (train_config.num_steps if config.optim.schedule_steps == -1
                    else config.optim.schedule_steps)
  schedule = optim.learning_rate_schedule(config.optim, schedule_steps)
  optimizer = optim.make_optimizer(config.optim, schedule_steps,
                                   config.model.get('flavor', 'paper'))
  host_memory = state_lib.host_memory_parts(config.optim)
  abstract_state, state_shardings = state_lib.state_shardings(model, optimizer, mesh, rules,
                                                              host_memory)
  batch_spec = nn.logical_to_mesh_axes(('batch', 'length'), rules)
  batch_sharding = NamedSharding(mesh, batch_spec)
  replicated = NamedSharding(mesh, PartitionSpec())

  intact, damaged = checkpoint.newest_intact_step(checkpoint.checkpoint_directory(workdir))
  record = (run_config.record(config) if intact is None
            else _resumed_record(config, workdir, intact, recorded))
  for bad_step, target in checkpoint.set_aside(workdir, damaged).items():
    problem = dict(damaged)[bad_step]
    _print(f'checkpoint step {bad_step} is damaged ({problem}); moved to {target} and '
           f'skipped: resuming from step {intact}')
  manager = checkpoint.checkpoint_manager(workdir, train_config, record)
  try:
    state, data_restored = (None, False) if intact is None else checkpoint.restore(
        manager, abstract_state, state_shardings, data_iterator, step=intact, verified=True)
    if state is not None and not data_restored:
      _print(f'checkpoint step {int(state.step)} was written by a different number of '
             'processes: the model state is restored, the data stream restarts with a fresh '
             f'shuffle (seed {config.data.shuffle_seed} + {int(state.step)})')
      data_iterator = make_data(config.data.shuffle_seed + int(state.step))
    if state is None:
      state = state_lib.create_state(model, optimizer, mesh, rules,
                                     jax.random.PRNGKey(train_config.seed), host_memory)
      if train_config.init_from_hf:
        state = _start_from_hf(state, state_shardings, config)
    start_step = int(state.step)
    if start_step >= train_config.num_steps:
      _print(f'{workdir}: checkpoint step {start_step} already reaches train.num_steps='
             f'{train_config.num_steps}; nothing to train (raise --config.train.num_steps to '
             'continue)')
      return {}
    return _loop(config, workdir, manager, state, data_iterator, model, optimizer, schedule,
                 mesh, rules, state_shardings, batch_sharding, replicated)
  finally:
    _close(manager)


def _close(manager):
  """Waits for the save in flight (recorded once committed: checkpoint.finish) and closes; an
  error here only matters if none is raised."""
  failing = sys.exc_info()[0] is not None
  try:
    checkpoint.finish(manager)
    manager.close()
  except Exception:  # noqa: BLE001
    if not failing:
      raise


def _loop(config, workdir, manager, state, data_iterator, model, optimizer, schedule, mesh,
          rules, state_shardings, batch_sharding, replicated):
  train_config = config.train
  start_step = int(state.step)
  train_fn = jax.jit(
      functools.partial(step_lib.train_step, model=model, optimizer=optimizer,
                        schedule=schedule, grad_accum_steps=train_config.grad_accum_steps),
      in_shardings=(state_shardings, batch_sharding), out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  eval_fn = jax.jit(functools.partial(step_lib.eval_step, model=model),
                    in_shardings=(state_shardings.params, batch_sharding),
                    out_shardings=replicated)

  tokens_per_step = train_config.global_batch_size * config.data.seq_len
  flops_per_step = flops.train_flops_per_token(config.model, config.data.seq_len) * tokens_per_step
  peak = flops.peak_tflops(jax.devices()[0].device_kind)
  writer = MetricWriter(workdir, start_step)
  preemption = _Preemption(manager)
  progress = tqdm(total=train_config.num_steps, initial=start_step, desc='train',
                  disable=not sys.stderr.isatty() or jax.process_index() != 0)
  last, interval_sums, summed_steps = {}, None, 0
  interval_start, interval_steps = None, 0
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      for step in range(start_step, train_config.num_steps):
        batch = _global_batch(next(data_iterator), batch_sharding, config.model.vocab_size)
        state, metrics = train_fn(state, batch)
        interval_sums = metrics if interval_sums is None else jax.tree_util.tree_map(
            lambda total, value: total + value, interval_sums, metrics)  # stays on device
        summed_steps += 1
        global_step = step + 1
        progress.update(1)
        checkpoint.save_failed(manager)  # a failed asynchronous save stops the run here
        if interval_start is None:  # the first step compiles; time from its end
          jax.block_until_ready(metrics)
          interval_start, interval_steps = time.perf_counter(), 0
        else:
          interval_steps += 1
        if global_step % train_config.log_every == 0 or global_step == train_config.num_steps:
          metrics = {name: value / summed_steps for name, value in
                     jax.device_get(interval_sums).items()}  # means over the interval
          if not all(np.isfinite(metrics[name]) for name in ('loss', 'grad_norm')):
            raise RunError(f'step {global_step}: the loss ({metrics["loss"]}) or gradient norm '
                           f'({metrics["grad_norm"]}) of steps {global_step - summed_steps + 1}'
                           f'-{global_step} is not finite; training stopped without saving. '
                           + _resume_hint(manager))
          metrics['learning_rate'] = float(schedule(step))
          interval_sums, summed_steps = None, 0
          if interval_steps:
            seconds = (time.perf_counter() - interval_start) / interval_steps
            metrics['tokens_per_second'] = tokens_per_step / seconds
            metrics['tflops_per_device'] = flops_per_step / seconds / jax.device_count() / 1e12
            if peak:
              metrics['mfu'] = metrics['tflops_per_device'] / peak
            interval_start, interval_steps = time.perf_counter(), 0
          last = dict(metrics)
          writer.write(global_step, metrics)
          _report(progress, global_step, train_config.num_steps, metrics)
        if global_step % train_config.eval_every == 0 or global_step == train_config.num_steps:
          eval_loss = evaluate(state.params, config, eval_fn, batch_sharding)
          writer.write(global_step, {'eval_loss': eval_loss})
          last['eval_loss'] = eval_loss
          _report(progress, global_step, train_config.num_steps, {'eval_loss': eval_loss})
        preempted = preemption.reached(global_step)
        if (global_step % train_config.checkpoint_every == 0 or preempted
            or global_step == train_config.num_steps):
          _check_finite(state, global_step, manager)
          checkpoint.save(manager, global_step, state, data_iterator, force=True)
        if preempted:
          _report(progress, global_step, train_config.num_steps,
                  {'preempted_checkpoint_step': global_step})
          break
      checkpoint.finish(manager)  # the last save is committed, or RunError
  finally:
    preemption.restore()
    progress.close()
    writer.close()
  return last


def _print(message):
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)


def _report(progress, step, num_steps, metrics):
  if jax.process_index() != 0:
    return
  text = ' '.join(f'{k} {v:.4g}' for k, v in metrics.items() if k != 'loss_tokens')
  line = f'step {step}/{num_steps} {text}'
  if progress.disable:
    print(line, flush=True)
  else:
    progress.write(line)
