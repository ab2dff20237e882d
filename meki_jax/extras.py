"""A clean exit when an optional dependency is missing: which extra of meki-jax installs it.

Imports nothing beyond the standard library (and meki_jax.cli, which imports no more), so the
device tools (torch only, no jax or absl) can call it first.
"""

import importlib

from meki_jax import cli


def require_extra(extra, module):
  """Imports `module`, or exits (status 1) saying which extra installs it."""
  try:
    importlib.import_module(module)
  except ModuleNotFoundError as error:
    if error.name != module and not (error.name or '').startswith(module + '.'):
      raise
    cli.fail(f'this needs the {module} package, which the [{extra}] extra installs: pip install '
             f'"meki-jax[{extra}]" (or pip install -e ".[{extra}]" in a clone)')
