"""Prints the bytes of a config's device export in each scheme: the program (RAM) and the
folded tables (ROM), by export/device_sizes.py's rules.

  python tools/device_sizes.py --config configs/meki_1p7b.py [--group_size=32] [--json]
"""

from meki_jax import cli

cli.start(__name__)  # Ctrl-C is one line from here on

import json  # noqa: E402

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax.config import validate_model  # noqa: E402
from meki_jax.extras import require_extra  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'A config file (configs/*.py).',
                                          lock_config=True)
_GROUP_SIZE = flags.DEFINE_integer('group_size', 32, '8da4w weights per scale.')
_JSON = flags.DEFINE_bool('json', False, 'Print one JSON object instead of a table.')


def main(argv):
  del argv
  require_extra('device', 'torch')
  from meki_jax.export import device_sizes
  config = validate_model(_CONFIG.value.model).to_dict()
  sizes = {'program': {program: device_sizes.program_bytes(config, program, _GROUP_SIZE.value)
                       for program in device_sizes.PROGRAMS},
           'tables': {scheme.name: device_sizes.table_bytes(config, scheme)
                      for scheme in device_sizes.schemes()}}
  if _JSON.value:
    print(json.dumps(sizes))
    return
  for kind, by_scheme in sizes.items():
    for scheme, size in by_scheme.items():
      print(f'{kind:8s} {scheme:10s} {size:>16,d} B  {size / 2**30:7.3f} GiB')


if __name__ == '__main__':
  flags.mark_flag_as_required('config')
  cli.run_absl(main)
