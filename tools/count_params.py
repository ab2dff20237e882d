"""Prints a config's RAM parameters after the fold, ROM weights (MeKi's folded tables, the PLE
table, Engram's n-gram tables) and training-only parameters.

  python tools/count_params.py --config configs/meki_1p7b.py [--json]
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

import json  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax.config import validate_model  # noqa: E402
from meki_jax.param_count import count_params  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py).',
                                          lock_config=True)
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


def main(argv):
  del argv
  counts = count_params(validate_model(_CONFIG.value.model))
  if _JSON.value:
    print(json.dumps(counts))
    return
  rows = [('RAM (inference, after the fold)', counts['ram_params']),
          ('ROM (token-indexed tables)', counts['rom_params']),
          ('training-only (removed by the fold)', counts['train_params']),
          ('training total', counts['train_total_params'])]
  for label, value in rows:
    print(f'{label:38s} {value:>15,d}  {value / 1e9:6.2f}B')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run_absl(main)
