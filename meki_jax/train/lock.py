"""One trainer per workdir: `<workdir>/trainer.lock`, held by the run's process 0.

The lock names its holder ({'host', 'pid', 'pid_start', 'processes', 'started', 'heartbeat'}).
In a local workdir (`FileLock`) the file is held with flock(2), which the kernel releases when
the holder dies however it dies (kill -9 included), so a killed trainer never blocks its resume.
Where flock is not shared (another host on a network filesystem without locks), the recorded
holder decides: on this host it holds the lock while that process lives; on another host while
its heartbeat (rewritten every HEARTBEAT_SECONDS) is younger than STALE_SECONDS. In a gs://
workdir (`ObjectLock`) the lock is an object created only if absent (ifGenerationMatch=0: of two
trainers starting at once exactly one creates it), its heartbeat rewritten only over the
generation this run wrote, and taken over, by a write conditional on the generation read, only
when the same rule finds it stale. On a pod only process 0 takes the lock, so it belongs to the
run rather than to one host's process.
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


def _still_held(holder):
  """Why the recorded `holder` (a dict or None) still holds the lock, or None if it is stale."""
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


def _refusal(path, holder, still):
  return RunError(f'another trainer is using this workdir: {path} names {describe(holder)}, '
                  f'which {still}. Stop that run or use another --workdir')


class _Heartbeat:
  """What both locks do once they hold: `_beat` in a daemon thread until `_stop_beating`."""

  def _beating(self, holder):
    """Starts the heartbeat; returns the stale `holder` replaced (said on stderr) or None."""
    self._thread = threading.Thread(target=self._beat, name='trainer.lock heartbeat',
                                    daemon=True)
    self._thread.start()
    if holder and holder.get('pid') != os.getpid():
      print(f'{self.path}: took over the stale lock of {describe(holder)}, which is no longer '
            'running', file=sys.stderr, flush=True)
      return holder
    return None

  def _stop_beating(self):
    self._stop.set()
    self._thread.join()


def _new_record(processes):
  now = time.time()
  return {'host': socket.gethostname(), 'pid': os.getpid(),
          'pid_start': _process_start(os.getpid()), 'processes': processes, 'started': now,
          'heartbeat': now}


def workdir_lock(workdir, processes=1):
  """The lock of `workdir`: an ObjectLock on Cloud Storage, else a FileLock."""
  return (ObjectLock if files.is_remote(workdir) else FileLock)(workdir, processes)


def describe(holder):
  started = datetime.datetime.fromtimestamp(holder.get('started', 0)).isoformat(
      sep=' ', timespec='seconds')
  return f'pid {holder.get("pid")} on host {holder.get("host")} (since {started})'


class FileLock(_Heartbeat):
  """acquire() or RunError naming the holder; release() at the end of the run."""

  def __init__(self, workdir, processes=1):
    self.path = files.path(workdir) / FILENAME
    self._processes = processes
    self._descriptor = None
    self._record = None
    self._stop = threading.Event()
    self._thread = None

  def _read(self):
    for _ in range(3):  # a heartbeat may be half-written: read again
      try:
        text = self.path.read_text(encoding='utf-8')
      except FileNotFoundError:
        return None
      try:
        return json.loads(text) if text.strip() else None
      except json.JSONDecodeError:
        time.sleep(0.05)
    return {'host': '?', 'pid': '?', 'unreadable': True}

  def acquire(self):
    """Takes the lock; returns the stale holder it replaced (a dict) or None."""
    files.make_directory(self.path.parent)
    descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, files.umask_mode())
    try:
      fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      os.close(descriptor)
      holder = self._read() or {}
      raise RunError(f'another trainer is using this workdir: {self.path} is held by '
                     f'{describe(holder)}. Stop that run or use another --workdir') from error
    holder = self._read()
    still = _still_held(holder)  # flock was granted, but the holder may be on another host
    if still:
      os.close(descriptor)
      raise _refusal(self.path, holder, still)
    self._descriptor = descriptor
    self._record = _new_record(self._processes)
    try:
      self._write()
    except OSError:  # a full disk: nothing is held, and no empty lock file is left
      os.remove(self.path)
      os.close(descriptor)
      self._descriptor = None
      raise
    return self._beating(holder)

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
    self._stop_beating()
    try:
      os.remove(self.path)
    finally:
      os.close(self._descriptor)
      self._descriptor = None


class ObjectLock(_Heartbeat):
  """The lock of a gs:// workdir (module docstring): acquire() or RunError naming the holder;
  release() at the end of the run. A run whose lock was taken over (it wrote no heartbeat for
  STALE_SECONDS) finds out at its next heartbeat, says so on stderr and sets `lost`."""

  def __init__(self, workdir, processes=1):
    self.path = files.path(workdir) / FILENAME
    self._processes = processes
    self._object = None
    self._generation = None
    self._record = None
    self._stop = threading.Event()
    self._thread = None
    self.lost = False

  def _blob(self):
    from google.cloud import storage
    bucket, _, name = str(self.path).partition('://')[2].partition('/')
    return storage.Client().bucket(bucket).blob(name)

  def _holder(self, blob):
    """(the recorded holder, the generation it was read at), or (None, None) if there is none."""
    from google.api_core import exceptions
    try:
      blob.reload()
      generation = blob.generation
      text = blob.download_as_bytes(if_generation_match=generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):  # released, or rewritten
      return None, None
    try:
      return json.loads(text), generation
    except json.JSONDecodeError:
      return {'host': '?', 'pid': '?', 'unreadable': True}, generation

  def acquire(self):
    """Takes the lock; returns the stale holder it replaced (a dict) or None."""
    from google.api_core import exceptions
    files.check_bucket(self.path)
    blob = self._blob()
    self._record = _new_record(self._processes)
    holder = None
    with files.naming(self.path):
      try:
        blob.upload_from_string(json.dumps(self._record), if_generation_match=0)
      except exceptions.PreconditionFailed:
        holder, generation = self._holder(blob)
        still = _still_held(holder)
        if still:
          raise _refusal(self.path, holder, still) from None
        try:  # only over the generation found stale: of two trainers taking over, one wins
          blob.upload_from_string(json.dumps(self._record), if_generation_match=generation or 0)
        except exceptions.PreconditionFailed:
          raise RunError(f'another trainer is using this workdir: {self.path} changed while '
                         'this one was taking it over. Stop that run or use another '
                         '--workdir') from None
    self._object, self._generation = blob, blob.generation
    return self._beating(holder)

  def _beat(self):
    from google.api_core import exceptions
    while not self._stop.wait(HEARTBEAT_SECONDS):
      self._record['heartbeat'] = time.time()
      try:
        self._object.upload_from_string(json.dumps(self._record),
                                        if_generation_match=self._generation)
        self._generation = self._object.generation
      except exceptions.PreconditionFailed:
        self.lost = True
        print(f'{self.path} was taken over by another trainer after this run wrote no heartbeat '
              f'for {STALE_SECONDS} s: this run no longer holds the workdir', file=sys.stderr,
              flush=True)
        return
      except exceptions.GoogleAPIError:  # a failed request must not kill the run: next beat
        pass

  def release(self):
    from google.api_core import exceptions
    if self._object is None:
      return
    self._stop_beating()
    try:  # only our own generation (fake-gcs-server ignores a delete's precondition: look first)
      self._object.reload()
      if self._object.generation == self._generation:
        self._object.delete(if_generation_match=self._generation)
    except (exceptions.NotFound, exceptions.PreconditionFailed):  # taken over: not ours to delete
      pass
    finally:
      self._object = None
