"""A clean exit when an optional dependency is missing: which extra of meki-jax installs it.

Imports nothing beyond the standard library, so the device tools (torch only, no jax or absl)
can call it first.
"""

import importlib
import os
import sys


def require_extra(extra, module):
  """Imports `module`, or exits (status 1) saying which extra installs it."""
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as error:
    if error.name != module and not (error.name or '').startswith(module + '.'):
      raise
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'meki_jax'
    if program == '__main__.py':
      program = 'python -m meki_jax.eval' if module == 'lm_eval' else program
    print(f'{program}: error: this needs the {module} package, which the [{extra}] extra '
          f'installs: pip install "meki-jax[{extra}]" (or pip install -e ".[{extra}]" in a '
          'clone)', file=sys.stderr, flush=True)
    sys.exit(1)
