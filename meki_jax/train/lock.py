"""One trainer per workdir: `<workdir>/trainer.lock`, held by the run's process 0.

The file names its holder ({'host', 'pid', 'pid_start', 'processes', 'started', 'heartbeat'})
and is held with flock(2), which the kernel releases when the holder dies however it dies
(kill -9 included), so a killed trainer never blocks its resume. Where flock is not shared
(another host on a network filesystem without locks, e.g. Cloud Storage FUSE), the recorded
holder decides: on this host it holds the lock while that process lives; on another host while
its heartbeat (rewritten every HEARTBEAT_SECONDS) is younger than STALE_SECONDS. On a pod only
process 0 takes the lock, so it belongs to the run rather than to one host's process.
"""

import datetime
import fcntl
import json
import os
import socket
import sys
import threading
import time

from meki_jax import files
from meki_jax.train.errors import RunError

FILENAME = 'trainer.lock'
HEARTBEAT_SECONDS = 30
STALE_SECONDS = 300


def _process_start(pid):
  """The start time of process `pid` in clock ticks since boot (Linux), or None."""
  try:
    with open(f'/proc/{pid}/stat', encoding='ascii') as stat:
      return int(stat.read().rsplit(')', 1)[1].split()[19])
  except (OSError, ValueError, IndexError):
    return None


def _alive(pid, pid_start):
  """Whether process `pid` on this host is running and is the one that started at `pid_start`."""
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    pass
  start = _process_start(pid)
  return start is None or pid_start is None or start == pid_start  # else the pid was reused


def describe(holder):
  started = datetime.datetime.fromtimestamp(holder.get('started', 0)).isoformat(
      sep=' ', timespec='seconds')
  return f'pid {holder.get("pid")} on host {holder.get("host")} (since {started})'


class WorkdirLock:
  """acquire() or RunError naming the holder; release() at the end of the run."""

  def __init__(self, workdir, processes=1):
    self.path = os.path.join(workdir, FILENAME)
    self._processes = processes
    self._descriptor = None
    self._record = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self):
    for _ in range(3):  # a heartbeat may be half-written: read again
      try:
        with open(self.path, encoding='utf-8') as stream:
          text = stream.read()
      except FileNotFoundError:
        return None
      try:
        return json.loads(text) if text.strip() else None
      except json.JSONDecodeError:
        time.sleep(0.05)
    return {'host': '?', 'pid': '?', 'unreadable': True}

  def _held_by_other(self, holder):
    """Why the recorded `holder` still holds the lock although flock was granted, or None."""
    if holder is None or holder.get('unreadable'):
      return None
    if holder.get('host') == socket.gethostname():
      if holder.get('pid') != os.getpid() and _alive(holder.get('pid'), holder.get('pid_start')):
        return 'is still running'
      return None
    age = time.time() - holder.get('heartbeat', 0)
    if age < STALE_SECONDS:
      return (f'wrote a heartbeat {age:.0f} s ago (a lock on another host counts as stale '
              f'after {STALE_SECONDS} s without one)')
    return None

  def acquire(self):
    """Takes the lock; returns the stale holder it replaced (a dict) or None."""
    os.makedirs(os.path.dirname(self.path) or '.', exist_ok=True)
    descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, files.umask_mode())
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(descriptor)
      holder = self._read() or {}
      raise RunError(f'another trainer is using this workdir: {self.path} is held by '
                     f'{describe(holder)}. Stop that run or use another --workdir') from error
    holder = self._read()
    still = self._held_by_other(holder)
    if still:
      os.close(descriptor)
      raise RunError(f'another trainer is using this workdir: {self.path} names '
                     f'{describe(holder)}, which {still}. Stop that run or use another --workdir')
    self._descriptor = descriptor
    now = time.time()
    self._record = {'host': socket.gethostname(), 'pid': os.getpid(),
                    'pid_start': _process_start(os.getpid()), 'processes': self._processes,
                    'started': now, 'heartbeat': now}
    try:
      self._write()
    except OSError:  # a full disk: nothing is held, and no empty lock file is left
      os.remove(self.path)
      os.close(descriptor)
      self._descriptor = None
      raise
    self._thread = threading.Thread(target=self._beat, name='trainer.lock heartbeat',
                                    daemon=True)
    self._thread.start()
    if holder and holder.get('pid') != os.getpid():
      print(f'{self.path}: took over the stale lock of {describe(holder)}, which is no longer '
            'running', file=sys.stderr, flush=True)
      return holder
    return None

  def _write(self):
    """Rewrites the record in place (a rename would leave the flock on the old file)."""
    data = json.dumps(self._record).encode()
    with files.naming(self.path):
      os.ftruncate(self._descriptor, 0)
      os.pwrite(self._descriptor, data, 0)
      os.fsync(self._descriptor)

  def _beat(self):
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self._record['heartbeat'] = time.time()
      try:
        self._write()
      except OSError:  # a full disk must not kill the run through its lock
        pass

  def release(self):
    if self._descriptor is None:
      return
    self._stop.set()
    self._thread.join()
    try:
      os.remove(self.path)
    finally:
      os.close(self._descriptor)
      self._descriptor = None
