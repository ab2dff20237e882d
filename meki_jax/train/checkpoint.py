"""Orbax checkpoints of the training state and the data iterator, in `<workdir>/checkpoints`.

Saves are asynchronous and atomic: orbax writes each step into a temporary directory and
renames it when every process has finished, so an interrupted save is never found as the
latest step. Before the rename, process 0 writes the step's checksum manifest
(`checksums.json`, see checksums.py): a step counts as complete only with it, restores verify it
and fall back to the newest intact step, naming the damaged file. A Manager given the run's
record (run_config.record) writes it into every step as `config.json` before the manifest, and
copies it to `<workdir>/config.json` once the step is committed. Only complete steps count
towards `train.keep_checkpoints`, so a failed or damaged save never rotates a good one out.
Restores take the target shardings of the current mesh, so a checkpoint written on N devices
(or hosts) restores on M. On Cloud Storage (a gs:// workdir) orbax has no rename: it writes the
step in place and commits it with a `commit_success.txt` object written after the manifest, and
a step counts only with that object (checksums.committed_steps).
"""

import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from meki_jax import files, run_config
from meki_jax.train import checksums
from meki_jax.train.errors import RunError
from meki_jax.train.state import in_device_memory

DAMAGED = 'damaged_checkpoints'  # <workdir>/damaged_checkpoints/<step>: set aside, never deleted
_REASON_BYTES = 2048


class Manager(ocp.CheckpointManager):
  """orbax's CheckpointManager with a checksum manifest in every step and our own rotation.

  orbax's own rotation (max_to_keep) is off: it deletes old steps even when the new save failed.
  """

  def __init__(self, directory, keep_checkpoints, record=None):
    self.keep_checkpoints = keep_checkpoints
    self.record = record  # the run's config as JSON text, or None (nothing recorded)
    self.pending_step = None  # the step whose asynchronous save is in flight (finish clears it)
    self.manifest_step = None  # the step the manifest callback writes
    self.manifest_error = None  # why the manifest of pending_step could not be written
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None, create=True, enable_async_checkpointing=True,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_manifest))
    super().__init__(directory, options=options, item_names=('state', 'data'))

  def _write_manifest(self):
    """orbax calls this on process 0 once every process has written the pending step, before
    the temporary directory is renamed into place."""
    step = self.manifest_step
    try:
      directory = _unfinalized_directory(self.directory, step)
      if self.record is not None:
        run_config.write(directory, self.record)
      checksums.write_manifest(directory)
    except Exception as error:  # noqa: BLE001  (re-raised: orbax then does not commit the step)
      self.manifest_error = _one_line(error)
      raise


def _one_line(error):
  return ' '.join(f'{type(error).__name__}: {error}'.split())


def _unfinalized_directory(directory, step):
  """The directory orbax is writing `step` into: `<step>.orbax-checkpoint-tmp` (orbax 0.12;
  other versions add -<timestamp>: the newest), else the final one (commit-file storage)."""
  directory = files.path(directory)
  temporary = list(directory.glob(f'{step}.orbax-checkpoint-tmp*'))
  if temporary:
    return max(temporary, key=lambda path: int(path.name.rpartition('-tmp')[2].lstrip('-') or 0))
  return directory / str(step)


def checkpoint_directory(workdir):
  return files.path(workdir) / 'checkpoints'


def checkpoint_manager(workdir, train_config, record=None):
  """A Manager keeping the last `train.keep_checkpoints` complete steps, recording `record`."""
  return Manager(checkpoint_directory(workdir), train_config.keep_checkpoints, record)


saved_steps = checksums.committed_steps


def _agreed(problem):
  """Every process' `problem` (None or a sentence) -> the first one any process found."""
  if jax.process_count() == 1:
    return problem
  encoded = np.zeros(_REASON_BYTES, np.uint8)
  text = (problem or '').encode()[:_REASON_BYTES]
  encoded[:len(text)] = np.frombuffer(text, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(encoded))
  for row in gathered.reshape(-1, _REASON_BYTES):
    text = row.tobytes().rstrip(b'\0').decode(errors='replace')
    if text:
      return text
  return None


def verify_step(directory, step):
  """None if checkpoint `step` matches its checksum manifest, else the first problem.

  Each process hashes its share of the files; all processes get the same answer.
  """
  return _agreed(checksums.verify(files.path(directory) / str(step), jax.process_index(),
                                  jax.process_count()))


def newest_intact_step(directory, steps=None):
  """(newest step that verifies or None, [(newer step, its problem), ...] newest first);
  RunError if no step verifies (checksums.newest_intact, with every process' answer agreed)."""
  steps = saved_steps(directory) if steps is None else steps
  return checksums.newest_intact(directory, steps, verify_step)


def set_aside(workdir, damaged):
  """Moves damaged steps to <workdir>/damaged_checkpoints/ (process 0; all processes wait).

  Returns where each went. They are kept for inspection, out of the way of new saves.
  """
  moved = {}
  target_root = files.path(workdir) / DAMAGED
  for step, _ in damaged:
    target = target_root / str(step)
    suffix = 1
    while target.exists():
      target, suffix = target_root / f'{step}-{suffix}', suffix + 1
    moved[step] = target
    if jax.process_index() == 0:
      files.move(checkpoint_directory(workdir) / str(step), target)
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('meki_jax: damaged checkpoints set aside')
  return moved


def save(manager, step, state, data_iterator, force=False):
  """Starts an asynchronous save of `state` and the iterator position at `step`.

  Waits for the previous save first (orbax would anyway), raising RunError if it failed.
  """
  finish(manager)
  args = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  manager.pending_step = manager.manifest_step = step
  manager.manifest_error = None
  try:
    return manager.save(step, args=ocp.args.Composite(**args), force=force)
  except Exception as error:  # noqa: BLE001  (disk full, permissions: one clear error)
    manager.pending_step = None
    raise RunError(f'saving checkpoint step {step} to {manager.directory} failed: '
                   f'{_one_line(error)}') from error


def save_failed(manager):
  """A cheap check between steps (one process): RunError if the save in flight has failed.

  Multi-process runs find out at the next save or at the end (the check would need a barrier).
  """
  if manager.pending_step is None or jax.process_count() > 1:
    return
  if manager.manifest_error is not None or not manager.is_saving_in_progress():
    finish(manager)


def finish(manager):
  """Waits for the save in flight; RunError unless it is committed with its manifest. Then
  rotates: only the newest `keep_checkpoints` complete steps stay."""
  step, manager.pending_step = manager.pending_step, None
  if step is None:
    return
  error = None
  try:
    manager.wait_until_finished()
    manager.check_for_errors()
  except Exception as caught:  # noqa: BLE001
    error = _one_line(caught)
  directory = files.path(manager.directory)
  if step not in saved_steps(directory) or not _has_manifest(directory, step):
    reason = manager.manifest_error or error or 'the step directory was not committed'
    raise RunError(f'saving checkpoint step {step} to {manager.directory} failed: {reason}. '
                   'Training stopped; ' + _last_complete(directory, step))
  if manager.record is not None and jax.process_index() == 0:
    run_config.write(directory.parent, manager.record)
  complete = [s for s in saved_steps(directory) if _has_manifest(directory, s)]
  for old in complete[:-manager.keep_checkpoints]:
    if old in manager.all_steps():
      manager.delete(old)
    elif jax.process_index() == 0:
      files.remove(directory / str(old))


def _has_manifest(directory, step):
  return (directory / str(step) / checksums.MANIFEST).exists()


def _last_complete(directory, failed_step):
  steps = [s for s in saved_steps(directory) if s != failed_step]
  return (f'the newest complete checkpoint is step {steps[-1]}' if steps
          else 'there is no complete checkpoint yet')


def _has_data_state(directory, step):
  """Whether `step` holds the iterator state of this process under the current process count.

  grain keys iterator states by (process index, process count); a checkpoint written by a
  different number of processes restores the model but cannot position this process' stream.
  """
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return (files.path(directory) / str(step) / 'data' / name).exists()


def nonfinite_leaves(tree):
  """Key paths ('params/layers/...') of the floating-point leaves holding a NaN or an inf."""
  leaves = [(path, leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if jnp.issubdtype(leaf.dtype, jnp.floating)]
  flags = jax.device_get(jax.jit(
      lambda xs: [jnp.all(jnp.isfinite(x)) for x in in_device_memory(xs)])(
          [leaf for _, leaf in leaves]))
  return [jax.tree_util.keystr(path, simple=True, separator='/')
          for (path, _), finite in zip(leaves, flags) if not finite]


def restore(manager, abstract_state, state_shardings, data_iterator, step=None,
            verified=False):
  """Restores the newest intact (or the given, verified) checkpoint into the given shardings.

  Returns (state, data_restored), or (None, False) when there is no checkpoint. Damaged newer
  steps are reported on stderr and skipped (not moved: see set_aside). The data iterator, when
  given, is positioned where the saved run left it if the checkpoint was written by the same
  number of processes (data_restored=True). `verified=True`: `step` was just verified.
  """
  directory = files.path(manager.directory)
  if step is None:
    step, damaged = newest_intact_step(directory)
    for line in checksums.skipped(damaged):
      _report(line)
    if step is None:
      return None, False
  else:
    if not (directory / str(step)).is_dir():
      raise FileNotFoundError(f'checkpoint step {step} does not exist in {directory} '
                              f'(steps there: {saved_steps(directory)})')
    problem = None if verified else verify_step(directory, step)
    if problem:
      raise RunError(f'checkpoint step {step} is damaged: {problem}')
  target = jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, state_shardings)
  args = {'state': ocp.args.StandardRestore(target)}
  data_restored = data_iterator is not None and _has_data_state(directory, step)
  if data_restored:
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except (ValueError, KeyError, FileNotFoundError) as error:
    raise ValueError(f'checkpoint step {step} in {directory} cannot be restored into '
                     f'this model/config: {error}') from error
  bad = nonfinite_leaves(restored['state'])
  if bad:
    raise RunError(f'checkpoint step {step} in {directory} holds NaN or inf values in '
                   f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}: it cannot be trained on')
  return restored['state'], data_restored


def _report(message):
  if jax.process_index() == 0:
    print(message, file=sys.stderr, flush=True)
