"""Ctrl-C from a program's first line to its last: one line and status 130, never a traceback.

`install(program)`, the first statement of every entry point (before jax is imported), routes
SIGINT through `signal.set_wakeup_fd` to a watcher thread. The thread acts at once, even while
the main thread is inside a long C call (an XLA compile, an orbax restore) where a Python handler
would wait for the call to return, and no KeyboardInterrupt is ever raised into jax or a library:
on main, Ctrl-C during start-up printed 61-251-line tracebacks, crashed the interpreter at exit,
or was swallowed by a garbage-collector callback while the run trained on.

A Ctrl-C prints `<program>: interrupted (Ctrl-C)`, runs the cleanups registered with `cleanup`
(newest first: the trainer's lock, a half-written output), stops the program's worker processes
and exits with status 130. While a `Deferred` is open (the trainer's loop, one process), SIGTERM
and a first Ctrl-C only request a stop, which the loop polls between steps; a Ctrl-C after that
exits at once. Without `install` (the trainer called from Python, e.g. by the tests) a `Deferred`
takes the signals with a Python handler for as long as it is open.

Signal handlers are process-wide, so this module's state is too. It imports the standard
library only: the device tools use it without jax.
"""

import contextlib
import os
import signal
import sys
import threading

_state = {'program': None,  # how the one line names the program
          'watching': False}  # whether the watcher thread takes the signals
_cleanups = []  # run newest first by an exit on a signal
_deferred = []  # the open Deferred, if any
_exiting = threading.Lock()


def install(program):
  """Routes SIGINT to the watcher thread from now on (call from the main thread, first).

  A SIGINT ignored by whoever started the program (a background job of a script) stays ignored,
  as Python itself leaves it.
  """
  if _state['watching'] or signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    return
  _state['program'] = program
  signal.signal(signal.SIGINT, _python_handler)  # acts itself until the watcher is installed
  read_end, write_end = os.pipe()
  os.set_blocking(write_end, False)
  threading.Thread(target=_watch, args=(read_end,), name='meki-interrupt', daemon=True).start()
  signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)  # from now on both see a signal
  _state['watching'] = True  # and only the watcher acts


def _watch(read_end):
  while True:
    for signum in os.read(read_end, 64):
      _handle(signum)


def _python_handler(signum, frame):
  """Runs in the main thread when it next executes Python code; with the watcher installed the
  watcher has acted already."""
  del frame
  if not _state['watching']:
    _handle(signum)


def _handle(signum):
  if _deferred and not (signum == signal.SIGINT and _deferred[-1].requested):
    _deferred[-1].request(signum)
  elif signum == signal.SIGINT:
    _exit(_deferred[-1].second_message if _deferred else 'interrupted (Ctrl-C)')


def _exit(message):
  """One line, the cleanups, the worker processes stopped, status 130 (once: the watcher and the
  main thread may both get here for a signal that arrived during `install`)."""
  if not _exiting.acquire(blocking=False):
    return
  program = _state['program'] or os.path.basename(sys.argv[0] or 'python')
  os.write(2, f'\n{program}: {message}\n'.encode())
  for function in reversed(list(_cleanups)):
    try:
      function()
    except Exception:  # noqa: BLE001  (exiting anyway; the next run cleans up what is left)
      pass
  _stop_workers()
  os._exit(130)


def _stop_workers():
  """Terminates the program's multiprocessing workers and unlinks the named semaphores of their
  queues, as multiprocessing does at a normal exit (its resource tracker would otherwise warn
  about 'leaked semaphore objects' after the one line)."""
  if 'multiprocessing' not in sys.modules:
    return
  import multiprocessing
  from multiprocessing import synchronize, util
  for child in multiprocessing.active_children():
    child.terminate()
  for finalizer in list(util._finalizer_registry.values()):  # noqa: SLF001  (no public API)
    if finalizer._callback is synchronize.SemLock._cleanup:  # noqa: SLF001
      finalizer()


@contextlib.contextmanager
def cleanup(function):
  """Runs `function` if a signal ends the program before the block ends."""
  _cleanups.append(function)
  try:
    yield
  finally:
    _cleanups.remove(function)


class Deferred:
  """While open, SIGTERM and a first Ctrl-C only set `requested` (printing `first_message` for a
  Ctrl-C); a Ctrl-C after that exits at once (status 130) printing `second_message`."""

  def __init__(self, first_message, second_message):
    self.first_message, self.second_message = first_message, second_message
    self.requested = False
    self._previous = {signal.SIGTERM: signal.signal(signal.SIGTERM, _python_handler)}
    if not _state['watching']:
      self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, _python_handler)
    _deferred.append(self)

  def request(self, signum):
    if signum == signal.SIGINT:
      os.write(2, f'\n{self.first_message}\n'.encode())
    self.requested = True

  def close(self):
    _deferred.remove(self)
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)
