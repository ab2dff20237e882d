"""Command-line plumbing shared by `meki_jax.train` and `meki_jax.generate`: errors as one line.

A config file that does not exist, a misspelled `--config.key` override or a value of the wrong
type, and the errors a run reports on purpose (RunError, ValueError with the field or file named,
OSError such as a full disk), end the program with `<program>: error: <message>` on stderr and
status 1 (2 for the command line) instead of a traceback. MEKI_TRACEBACK=1 shows tracebacks.
"""

import logging
import os
import sys

from absl import flags


def _program():
  """'python -m meki_jax.train' for .../meki_jax/train/__main__.py, else the script's name."""
  path = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else 'meki_jax'
  parts = path.removesuffix('.py').split(os.sep)
  if 'meki_jax' in parts:
    module = parts[len(parts) - 1 - parts[::-1].index('meki_jax'):]
    return 'python -m ' + '.'.join(module[:-1] if module[-1] == '__main__' else module)
  return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else 'meki_jax'


def fail(message, status=1):
  """Prints `<program>: error: message` to stderr and exits with `status`."""
  print(f'{_program()}: error: {message}', file=sys.stderr, flush=True)
  sys.exit(status)


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


def _check_config_files(argv, names):
  for argument in argv[1:]:
    for name in names:
      if argument.startswith(f'--{name}='):
        path = argument.split('=', 1)[1].split(':', 1)[0]
        if path and not os.path.exists(path):
          fail(f'--{name}={path}: no such file', 2)


def parse_flags(argv, config_flags=('config',)):
  """absl's flag parsing (for app.run's flags_parser) with one-line errors."""
  _check_config_files(argv, config_flags)
  try:
    return flags.FLAGS(argv)
  except flags.Error as error:
    if os.environ.get('MEKI_TRACEBACK'):
      raise
    lines = [line for line in str(error).splitlines() if line.strip()]
    text = lines[0] if len(lines) == 1 else f'{lines[0].split(":")[0]}: {lines[-1].strip()}'
    fail(f'{text} (--helpfull lists the flags)', 2)
  except (KeyError, AttributeError, TypeError, ValueError) as error:  # ml_collections' overrides
    if os.environ.get('MEKI_TRACEBACK'):
      raise
    text = _innermost_text(error)
    argument = _argument_naming(argv, text)
    fail(f'{argument + ": " if argument else ""}the config has no such field or cannot take '
         f'this value: {" ".join(text.split())}', 2)


def load_config(config_flag, flag_name='config'):
  """The ConfigDict of a config_flags flag; a missing or failing config file as one line."""
  try:
    return config_flag.value
  except Exception as error:  # noqa: BLE001  (whatever the config file raised)
    if os.environ.get('MEKI_TRACEBACK'):
      raise
    path = (flags.FLAGS[flag_name].serialize().split('=', 1)[-1] or '').split(':', 1)[0]
    if path and not os.path.exists(path):
      fail(f'--{flag_name}={path}: no such file', 2)
    cause = error.__cause__ or error.__context__ or error
    fail(f'--{flag_name}={path}: the config file failed: {type(cause).__name__}: {cause}', 2)


def report_errors(function, errors):
  """Runs `function()`; an exception of the types `errors` ends the program as one line."""
  try:
    return function()
  except errors as error:
    if os.environ.get('MEKI_TRACEBACK'):
      raise
    fail(f'{error} (MEKI_TRACEBACK=1 shows the traceback)')


class _OrbaxErrors(logging.Filter):
  """Drops orbax's ERROR records, and asyncio's about orbax's failed write tasks: a failed save
  is reported once, as a RunError."""

  def filter(self, record):
    if record.levelno < logging.ERROR:
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
  for logger in ('absl', 'asyncio'):
    logging.getLogger(logger).addFilter(_OrbaxErrors())
  sys.excepthook = _quiet_excepthook(sys.excepthook)
  sys.unraisablehook = _quiet_unraisablehook(sys.unraisablehook)
