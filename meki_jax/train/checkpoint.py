"""Orbax checkpoints of the training state and the data iterator, in `<workdir>/checkpoints`.

Saves are asynchronous and atomic: orbax writes each step into a temporary directory and
renames it when every process has finished, so an interrupted save is never found as the
latest step. Restores take the target shardings of the current mesh, so a checkpoint written
on N devices (or hosts) restores on M.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp


def checkpoint_manager(workdir, train_config):
  """A CheckpointManager keeping the last `train.keep_checkpoints` steps."""
  options = ocp.CheckpointManagerOptions(
      max_to_keep=train_config.keep_checkpoints, create=True,
      enable_async_checkpointing=True)
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), 'checkpoints'),
                               options=options, item_names=('state', 'data'))


def save(manager, step, state, data_iterator, force=False):
  """Starts an asynchronous save of `state` and the iterator position at `step`."""
  args = {'state': ocp.args.StandardSave(state)}
  if data_iterator is not None:
    args['data'] = grain.checkpoint.CheckpointSave(data_iterator)
  return manager.save(step, args=ocp.args.Composite(**args), force=force)


def _has_data_state(manager, step):
  """Whether `step` holds the iterator state of this process under the current process count.

  grain keys iterator states by (process index, process count); a checkpoint written by a
  different number of processes restores the model but cannot position this process' stream.
  """
  name = f'process_{jax.process_index()}-of-{jax.process_count()}.json'
  return os.path.exists(os.path.join(str(manager.directory), str(step), 'data', name))


def restore(manager, abstract_state, state_shardings, data_iterator, step=None):
  """Restores the latest (or `step`) checkpoint into the given shardings.

  Returns (state, data_restored), or (None, False) when there is no checkpoint. The data
  iterator, when given, is positioned where the saved run left it if the checkpoint was written
  by the same number of processes (data_restored=True).
  """
  step = manager.latest_step() if step is None else step
  if step is None:
    return None, False
  target = jax.tree_util.tree_map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_state, state_shardings)
  args = {'state': ocp.args.StandardRestore(target)}
  data_restored = data_iterator is not None and _has_data_state(manager, step)
  if data_restored:
    args['data'] = grain.checkpoint.CheckpointRestore(data_iterator)
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**args))
  except (ValueError, KeyError, FileNotFoundError) as error:
    raise ValueError(f'checkpoint step {step} in {manager.directory} cannot be restored into '
                     f'this model/config: {error}') from error
  return restored['state'], data_restored
