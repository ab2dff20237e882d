"""The logit lens of a checkpoint: per-layer KL(final || layer) over validation batches.

  python tools/logit_lens.py --workdir=runs/quickstart [--config=configs/quickstart.py] \
      [--num_batches=4] [--batch_size=8] [--form=training] [--out=runs/quickstart/logit_lens]

--workdir is a training workdir (its latest step) or <workdir>/checkpoints/<step>; the config
defaults to the one the trainer wrote there (<workdir>/config.json). Batches come from the
config's held-out data (make_eval_dataset, config.data.seq_len tokens per row); the table is
printed, and logit_lens.json and logit_lens.png are written to --out (default
<workdir>/logit_lens).
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax import run_config  # noqa: E402
from meki_jax.config import validate  # noqa: E402
from meki_jax.data.pipeline import make_eval_dataset  # noqa: E402
from meki_jax.eval import logit_lens, scoring  # noqa: E402
from meki_jax.export.exporter import checkpoint_step_dir  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run\'s config (configs/*.py[:arg]); '
                                          'default: <workdir>/config.json.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir or a step directory '
                                '<workdir>/checkpoints/<step>.')
_NUM_BATCHES = flags.DEFINE_integer('num_batches', None, 'Validation batches; default '
                                    'config.train.eval_batches.')
_BATCH_SIZE = flags.DEFINE_integer('batch_size', None, 'Rows per batch; default '
                                   'config.train.global_batch_size.')
_FORM = flags.DEFINE_enum('form', 'folded', ['folded', 'training'], 'Parameters to run.')
_OUT = flags.DEFINE_string('out', None, 'Output directory; default <workdir>/logit_lens.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  step_dir = checkpoint_step_dir(_WORKDIR.value)
  config = validate(_CONFIG.value or run_config.load(step_dir.parent.parent))
  eval_model = scoring.restore_eval_model(config, step_dir, folded=_FORM.value == 'folded')
  batches = make_eval_dataset(config.data, global_batch_size=_BATCH_SIZE.value or
                              config.train.global_batch_size)
  report = logit_lens.mean_layer_kl(eval_model, batches,
                                    _NUM_BATCHES.value or config.train.eval_batches)
  print(logit_lens.format_table(report))
  paths = logit_lens.write_report(report, _OUT.value or step_dir.parent.parent / 'logit_lens')
  print('wrote', *paths)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir'])
  cli.run_absl(main)
