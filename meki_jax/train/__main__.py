"""python -m meki_jax.train --config=configs/X.py --workdir=DIR [--config.key=value ...]

A bad command line or config, a damaged workdir, a second trainer on the workdir, a diverged
run or a failed save end with one line `... error: <what, where, what to do>` and status 1 (2 for
the command line); MEKI_TRACEBACK=1 shows the traceback instead. Ctrl-C before the first step
exits at once (status 130); during training see meki_jax/train/loop.py.
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax.train import distributed  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Checkpoints, metrics.jsonl and TensorBoard '
                               'events go here; an existing run in it is resumed.')
_COORDINATOR = flags.DEFINE_string('coordinator_address', None,
                                   'host:port of process 0 for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process\' index.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  cli.quiet_failed_saves()
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from meki_jax.train.loop import train  # after jax.distributed: nothing touches devices first
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  cli.run_absl(main)
