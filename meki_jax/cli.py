"""How every entry point starts and ends: Ctrl-C and known errors, each as one line.

Every command (`python -m meki_jax.train`, `.generate`, `.eval`, `tools/*.py`) calls
`start(__name__)` before its other imports (Ctrl-C is then one line and status 130 from there on,
see interrupt.py) and runs its main through `run` (argparse) or `run_absl` (absl flags). A known
error, raised on purpose with a message that names what and where (KNOWN_ERRORS: RunError,
ValueError, OSError such as a missing file or a full disk), ends the program with
`<program>: error: <message>` on stderr and status 1; a bad command line or config file (a
missing file, a syntax error, a misspelled `--config.key` override) with status 2.
MEKI_TRACEBACK=1 shows the traceback instead. Anything else is a bug and keeps its traceback.

Standard library only at import (absl is imported by the functions that parse absl flags), so
the device tools, which have torch but not jax or absl, share this path.
"""

import argparse
import os
import sys

from meki_jax import interrupt
from meki_jax.train.errors import RunError

KNOWN_ERRORS = (RunError, ValueError, OSError)
TRACEBACK_HINT = '(MEKI_TRACEBACK=1 shows the traceback)'


def program():
  """'python -m meki_jax.train' for .../meki_jax/train/__main__.py, else the script's name."""
  path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else 'meki_jax'
  parts = path.removesuffix('.py').split(os.sep)
  if 'meki_jax' in parts:
    module = parts[len(parts) - 1 - parts[::-1].index('meki_jax'):]
    return 'python -m ' + '.'.join(module[:-1] if module[-1] == '__main__' else module)
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'meki_jax'


def start(module_name):
  """Call first in an entry point with its `__name__`: in the program itself (not in a worker
  process that re-imports it) Ctrl-C is one line and status 130 from here on."""
  if module_name == '__main__':
    interrupt.install(program())


def fail(message, status=1):
  """Prints `<program>: error: message` to stderr and exits with `status`."""
  print(f'{program()}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


def _showing_tracebacks():
  return bool(os.environ.get('MEKI_TRACEBACK'))


def report(function):
  """Runs `function()`; a KNOWN_ERRORS exception ends the program as one line, status 1."""
  try:
    return function()
  except KNOWN_ERRORS as error:
    if _showing_tracebacks():
      raise
    fail(f'{" ".join(str(error).split()) or type(error).__name__} {TRACEBACK_HINT}')


def run(main):
  """The entry point of an argparse tool (its parser a cli.ArgumentParser): `main()` under
  `report`."""
  sys.exit(report(main))


class ArgumentParser(argparse.ArgumentParser):
  """argparse's parser whose usage errors are one line, `<program>: error: ...`, status 2."""

  def error(self, message):
    fail(message, 2)


def run_absl(main, config_flags=('config',)):
  """The entry point of an absl tool: flags parsed by `parse_flags`, `main(argv)` under
  `report`, and absl's UsageError as one line (status 2) instead of the module's docstring."""
  from absl import app

  def main_reporting(argv):
    try:
      return report(lambda: main(argv))
    except app.UsageError as error:
      if _showing_tracebacks():
        raise
      fail(str(error), 2)

  app.run(main_reporting, flags_parser=lambda argv: parse_flags(argv, config_flags))


def _argument_naming(argv, text):
  """The command-line argument a config error is about (the one naming its key), or ''."""
  key = text.split('\n')[0].strip('\'" ')
  for argument in argv[1:]:
    if argument.startswith('--config.') and key and key in argument.split('=')[0]:
      return argument
  return ''


def _innermost_text(error):
  """The message of an exception that wraps others as its first argument (KeyError in
  AttributeError, as ml_collections raises them)."""
  while isinstance(error, BaseException):
    error = error.args[0] if error.args else str(error)
  return str(error)


def _config_arguments(argv, names):
  """[(argument, path)] of the config-file flags on the command line ('--config=X.py:arg')."""
  return [(argument.split(':', 1)[0], argument.split('=', 1)[1].split(':', 1)[0])
          for argument in argv[1:] for name in names if argument.startswith(f'--{name}=')]


def _flag_error_text(error):
  """absl's flag error in one line: its first line, or the start of it and the last line (the
  exception a config file raised, after ml_collections' traceback)."""
  lines = [line for line in str(error).splitlines() if line.strip()]
  return lines[0] if len(lines) == 1 else f'{lines[0].split(":")[0]}: {lines[-1].strip()}'


def _config_file_failure(argv, names, error, text):
  """'--config=X.py: the config file failed: <error>' when running a config file failed
  (ml_collections runs the file and its get_config while the flag is parsed), else None."""
  arguments = _config_arguments(argv, names)
  if isinstance(error, SyntaxError):
    named = [argument for argument, path in arguments
             if os.path.abspath(path) == os.path.abspath(error.filename or '')]
    where = named[0] if named else error.filename
    return f'{where}: the config file failed: SyntaxError: {error.msg} (line {error.lineno})'
  for argument, _ in arguments:
    if text.startswith(f'flag {argument}: '):  # absl wraps the ValueErrors of get_config
      return f'{argument}: the config file failed: {text[len(f"flag {argument}: "):]}'
  return None


def parse_flags(argv, config_flags=('config',)):
  """absl's flag parsing (for app.run's flags_parser) with one-line errors, status 2."""
  from absl import flags
  arguments = _config_arguments(argv, config_flags)
  for argument, path in arguments:
    if path and not os.path.exists(path):
      fail(f'{argument}: no such file', 2)
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # noqa: BLE001  (whatever a config file raises is its failure)
    if _showing_tracebacks():
      raise
    if isinstance(error, flags.Error):
      text = _flag_error_text(error)
      fail(_config_file_failure(argv, config_flags, error, text) or
           f'{text} (--helpfull lists the flags)', 2)
    if isinstance(error, (KeyError, AttributeError, TypeError, ValueError)):  # the overrides
      text = _innermost_text(error)
      argument = _argument_naming(argv, text)
      fail(f'{argument + ": " if argument else ""}the config has no such field or cannot take '
           f'this value: {" ".join(text.split())}', 2)
    failure = _config_file_failure(argv, config_flags, error, '')
    if failure is None and not arguments:
      raise
    fail(failure or f'{arguments[0][0]}: the config file failed: {type(error).__name__}: '
         f'{" ".join(str(error).split())}', 2)


class _OrbaxErrors:
  """A logging filter: drops orbax's ERROR records, and asyncio's about orbax's failed write
  tasks: a failed save is reported once, as a RunError."""

  def filter(self, record):
    if record.levelno < 40:  # logging.ERROR
      return True
    if record.name == 'asyncio':
      return 'orbax' not in str(record.msg) + str(record.args) + str(record.exc_info)
    return f'{os.sep}orbax{os.sep}' not in record.pathname


def _closed_loop(kind, value):
  """tensorstore's late callbacks into orbax's closed event loop after a failed write."""
  return kind is RuntimeError and str(value) == 'Event loop is closed'


def _quiet_excepthook(previous):
  def hook(kind, value, traceback):
    if not _closed_loop(kind, value):
      previous(kind, value, traceback)
  return hook


def _quiet_unraisablehook(previous):
  def hook(unraisable):  # tensorstore reports its callbacks' exceptions as unraisable
    if not _closed_loop(unraisable.exc_type, unraisable.exc_value):
      previous(unraisable)
  return hook


def quiet_failed_saves():
  """After a failed checkpoint write, orbax logs each failed future and tensorstore prints a
  traceback per late callback (~75 on a full 20 MB disk); the trainer's one RunError says it."""
  import logging
  for logger in ('absl', 'asyncio'):
    logging.getLogger(logger).addFilter(_OrbaxErrors())
  sys.excepthook = _quiet_excepthook(sys.excepthook)
  sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)
