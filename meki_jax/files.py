"""The path layer: every filesystem call on a user's paths, local or `gs://`, and the writes that
lose nothing.

A path is a URL (STYLE habit 14): `path(location)` gives a local path as an absolute
pathlib.Path and `gs://bucket/key` as an etils.epath.Path (gcsfs underneath, what orbax uses);
any other scheme is refused, naming it. `kvstore` gives tensorstore the same location (its `file`
or `gcs` driver). The helpers below (`size`, `remove`, `move`, `files_under`, `local_copy`,
`Staged`) do what POSIX and Cloud Storage do differently.

`write_atomically` writes a small file through a temporary file and a rename, with the umask's
mode (on Cloud Storage: one upload, and an object appears whole or not at all).
`replacing(out, kind, ...)` is how every tool writes its output (a memory export, a device
bundle, token shards, a host-memory table): into `.<name>.partial` beside `out`, which takes
`out`'s place only once it is complete, so a failed or interrupted run leaves an old `out` as it
was. Cloud Storage has no rename: there the objects are copied (server-side) under `out` with
the kind's manifest last, and an old `out` loses its manifest first, so a reader, which requires
the manifest, never takes a partial output for a whole one. Before anything is written,
`check_output` refuses an `out` that is, contains or lies inside a source the command reads, and
lets --overwrite replace only an output of the same kind that meki-jax wrote (recognised by its
manifest, or for a file by its first bytes): never a source, never a directory of someone else's
files.

With STORAGE_EMULATOR_HOST set (a local GCS server such as fake-gcs-server, README "Cloud
Storage"), gcsfs and google-cloud-storage use it; `_use_emulator` points tensorstore and
google-cloud-cpp (ArrayRecord's reader of gs:// shards) at it too and skips gcsfs' bucket-type
probe over gRPC, which the emulator does not serve (60 s each).
"""

import contextlib
import glob as globlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

from meki_jax import interrupt

REMOTE_SCHEMES = ('gs',)


def _use_emulator():
  """With STORAGE_EMULATOR_HOST set: tensorstore's endpoint and dummy token, no gcsfs probe."""
  host = os.environ.get('STORAGE_EMULATOR_HOST')
  if not host:
    return
  url = host if '://' in host else f'http://{host}'
  os.environ.setdefault('TENSORSTORE_GCS_HTTP_URL', url)
  os.environ.setdefault('GOOGLE_AUTH_TOKEN_FOR_TESTING', 'emulator')  # tensorstore's fixed token
  os.environ.setdefault('GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT', 'false')
  os.environ.setdefault('CLOUD_STORAGE_EMULATOR_ENDPOINT', url)  # google-cloud-cpp: ArrayRecord


_use_emulator()


def is_remote(location):
  """Whether `location` is a URL (gs://...), not a local path."""
  return '://' in os.fspath(location)


def path(location):
  """A user's path or URL -> pathlib.Path (local, absolute, ~ expanded) or epath.Path (gs://).

  Raises ValueError for a URL scheme other than gs:// or a gs:// URL without a bucket.
  """
  text = os.fspath(location)
  if not is_remote(text):
    return pathlib.Path(os.path.abspath(os.path.expanduser(text)))
  scheme, _, rest = text.partition('://')
  if scheme not in REMOTE_SCHEMES:
    raise ValueError(f'{text}: {scheme}:// URLs are not supported; use a local path or '
                     'gs://bucket/...')
  if not rest.split('/', 1)[0]:
    raise ValueError(f'{text}: a gs:// URL needs a bucket (gs://bucket/...)')
  _configure_gcsfs()
  from etils import epath
  return epath.Path(f'{scheme}://{rest.rstrip("/")}')


def _configure_gcsfs():
  """No directory listings cached: other processes (tensorstore, the other hosts) write too.
  Raises ValueError naming the extra if gcsfs is not installed."""
  try:
    import gcsfs  # noqa: F401
  except ModuleNotFoundError as error:
    raise ValueError('gs:// paths need gcsfs and google-cloud-storage, which the [gcs] extra '
                     'installs: pip install "meki-jax[gcs]"') from error
  import fsspec.config
  fsspec.config.conf.setdefault('gcs', {})['use_listings_cache'] = False


def _filesystem():
  """gcsfs, the instance etils.epath uses (objects of zonal buckets finalized when written)."""
  import fsspec
  _configure_gcsfs()
  return fsspec.filesystem('gcs', finalize_on_close=True)


def check_bucket(location):
  """Raises FileNotFoundError unless the bucket of a gs:// `location` exists and can be reached
  (a local path passes): gcsfs would create a missing bucket where a directory is made."""
  if not is_remote(location):
    return
  bucket = str(path(location)).partition('://')[2].split('/', 1)[0]
  try:
    found = _filesystem().exists(bucket)
  except Exception as error:  # noqa: BLE001  (credentials, network: one clear error)
    raise FileNotFoundError(f'{location}: bucket gs://{bucket} cannot be reached: '
                            f'{type(error).__name__}: {error}') from error
  if not found:
    raise FileNotFoundError(f'{location}: bucket gs://{bucket} does not exist (or these '
                            'credentials cannot see it)')


def require_local(location, what):
  """Raises ValueError unless `location` is a local path (`what`: why it must be, for the
  message, e.g. 'it is memory-mapped')."""
  if is_remote(location):
    raise ValueError(f'{location} must be a local path: {what}; copy it from or to Cloud '
                     'Storage with `gcloud storage cp`')


def make_directory(location):
  """Creates a local directory and its parents if missing; nothing on Cloud Storage, which has
  no directories (gcsfs would create a missing bucket)."""
  location = path(location)
  if not is_remote(location):
    location.mkdir(parents=True, exist_ok=True)
  return location


def kvstore(location):
  """The tensorstore kvstore spec of a directory: the `file` or the `gcs` driver."""
  location = path(location)
  if not is_remote(location):
    return {'driver': 'file', 'path': str(location)}
  bucket, _, key = str(location).partition('://')[2].partition('/')
  return {'driver': 'gcs', 'bucket': bucket, 'path': key}


def size(location):
  """The size of a file in bytes."""
  location = path(location)
  if is_remote(location):
    return _filesystem().size(str(location))
  return location.stat().st_size


def glob(pattern):
  """Sorted paths (strings; gs:// URLs on Cloud Storage) of the files matching a glob."""
  if not is_remote(pattern):
    return sorted(name for name in globlib.glob(os.path.expanduser(os.fspath(pattern)))
                  if os.path.isfile(name))
  path(pattern)  # an unsupported scheme is named as such
  matches = _filesystem().glob(os.fspath(pattern), detail=True)  # one listing, no call per match
  return sorted(f'gs://{name}' for name, info in matches.items() if info['type'] == 'file')


def files_under(directory):
  """Sorted paths (relative, '/'-separated) of every file below `directory`."""
  directory = path(directory)
  if is_remote(directory):
    prefix = str(directory).partition('://')[2] + '/'
    return sorted(name[len(prefix):] for name in _filesystem().find(str(directory))
                  if name.startswith(prefix))
  return sorted(os.path.relpath(os.path.join(root, name), directory).replace(os.sep, '/')
                for root, _, names in os.walk(directory) for name in names)


def remove(location):
  """Removes a file or a directory tree, if there is one."""
  location = path(location)
  if is_remote(location):
    filesystem = _filesystem()
    if filesystem.exists(str(location)):
      filesystem.rm(str(location), recursive=True)
  elif location.is_dir() and not location.is_symlink():
    shutil.rmtree(location, ignore_errors=True)
  else:
    location.unlink(missing_ok=True)


def move(source, target):
  """Moves a file or directory tree to `target` (which must not exist; its parent is created):
  one rename, or on Cloud Storage a server-side copy of each object and then the deletions."""
  source, target = path(source), path(target)
  if not is_remote(source):
    target.parent.mkdir(parents=True, exist_ok=True)
    os.rename(source, target)
    return
  _copy_objects(source, target, files_under(source) if source.is_dir() else None)
  remove(source)


def _copy_objects(source, target, names):
  """Server-side copies of `source`/name to `target`/name for `names` (None: `source` is one
  object)."""
  if names is None:
    _filesystem().copy(str(source), str(target))
  elif names:
    _filesystem().copy([str(source / name) for name in names],
                       [str(target / name) for name in names])


@contextlib.contextmanager
def local_copy(location):
  """Yields a local path holding the file `location`: itself, or a downloaded temporary copy
  (removed afterwards) of an object, for readers that need a local file (safetensors)."""
  location = path(location)
  if not is_remote(location):
    yield location
    return
  with tempfile.TemporaryDirectory(prefix='meki-') as directory:
    local = pathlib.Path(directory) / location.name
    with naming(location):
      _filesystem().get_file(str(location), str(local))
    yield local


class Staged:
  """A file written at a local path (`local`) that `commit()` puts in place at `location`:
  by a rename from beside it, or on Cloud Storage by one upload from the temporary directory
  (the object appears whole or not at all). `discard()` removes it. For writers that need a
  local file (ArrayRecord, a memory-mapped safetensors file)."""

  def __init__(self, location):
    self.location = path(location)
    if is_remote(self.location):
      descriptor, name = tempfile.mkstemp(prefix='meki-', suffix=f'-{self.location.name}')
      os.close(descriptor)
      self.local = pathlib.Path(name)
    else:
      self.local = self.location.with_name(f'.{self.location.name}.{os.getpid()}.tmp')

  def commit(self):
    if is_remote(self.location):
      with naming(self.location):
        _filesystem().put_file(str(self.local), str(self.location))
      self.local.unlink()
    else:
      os.replace(self.local, self.location)

  def discard(self):
    self.local.unlink(missing_ok=True)


def umask_mode(mode=0o666):
  """`mode` less the process' umask: what open() would have given a new file."""
  mask = os.umask(0)
  os.umask(mask)
  return mode & ~mask


@contextlib.contextmanager
def naming(path):
  """Gives an OSError raised inside the block `path` as its file name when it has none (a write
  to a full disk says only '[Errno 28] No space left on device')."""
  try:
    yield
  except OSError as error:
    if error.filename is not None or error.errno is None:
      raise
    raise OSError(error.errno, error.strerror, str(path)) from error


def write_atomically(location, text, prefix=None):
  """Writes `text` to `location` through a temporary file in the same directory and a rename (on
  Cloud Storage: one upload, which is atomic).

  mkstemp creates files 0600; the file gets the umask's mode before it is renamed into place.
  """
  target = path(location)
  if is_remote(target):
    with naming(target):
      target.write_text(text)
    return
  prefix = prefix or f'.{target.name}.'
  with naming(target):
    descriptor, temporary = tempfile.mkstemp(dir=target.parent, prefix=prefix, suffix='.tmp')
    try:
      with os.fdopen(descriptor, 'w', encoding='utf-8') as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
      os.chmod(temporary, umask_mode())
      os.replace(temporary, target)
    except BaseException:
      if os.path.exists(temporary):
        os.remove(temporary)
      raise


class Kind(NamedTuple):
  """A kind of output meki-jax writes, as `check_output` recognises one: a directory holding a
  JSON `manifest` whose "format" is `format`, or (no manifest) a file that begins with `magic`."""
  what: str  # how messages call it: 'memory export'
  manifest: str | None = None
  format: str | None = None
  magic: bytes = b''

  @property
  def is_directory(self):
    return self.manifest is not None

  def recognises(self, location):
    location = path(location)
    try:
      if not self.is_directory:
        with location.open('rb') as stream:
          return stream.read(len(self.magic)) == self.magic
      record = json.loads((location / self.manifest).read_text(encoding='utf-8'))
    except (OSError, ValueError):
      return False
    return isinstance(record, dict) and record.get('format') == self.format

  def missing_mark(self):
    """Why a path is not this kind, for messages."""
    if self.is_directory:
      return f'it has no {self.manifest} with "format": "{self.format}"'
    return f'it does not begin with {self.magic!r}'


def temporary_path(out):
  """Where an output is assembled before it takes `out`'s place: `.<name>.partial` beside it."""
  out = path(out)
  return out.parent / f'.{out.name}.partial'


def _exists(location):
  return location.exists() or (not is_remote(location) and location.is_symlink())


def _overlap(out, source):
  """How `out` overlaps the input `source`, as the start of a sentence, or None (local symlinks
  resolved; a URL never overlaps a local path)."""
  out, source = path(out), path(source)
  if is_remote(out) != is_remote(source):
    return None
  if not is_remote(out):
    out, source = out.resolve(), source.resolve()
  if out == source:
    return f'{out} is an input of this command'
  if out in source.parents:
    return f'{out} contains {source}, an input of this command'
  if source in out.parents:
    return f'{out} lies inside {source}, an input of this command'
  return None


def check_output(out, kind, *, overwrite, sources=()):
  """Raises unless the `kind` output `out` may be written.

  ValueError if `out` is, contains or lies inside one of `sources` (what the command reads:
  replacing it, or writing into it, would damage the input). FileExistsError if `out` exists
  and `overwrite` is off, or if it exists and is not a `kind` (not one of our outputs): --overwrite
  replaces our own outputs only.
  """
  for source in sources:
    overlap = _overlap(out, source)
    if overlap:
      raise ValueError(f'{overlap}: write the {kind.what} somewhere else')
  out = path(out)
  if not _exists(out):
    return
  if not overwrite:
    raise FileExistsError(f'{out} exists; pass --overwrite to replace it')
  if not kind.recognises(out):
    raise FileExistsError(f'{out} exists and is not a {kind.what} ({kind.missing_mark()}): '
                          f'--overwrite replaces only a {kind.what}; move it away or choose '
                          'another path')


def _swap(temporary, out, kind):
  """`temporary` takes `out`'s place: a file by one rename; a directory by renaming an old `out`
  aside first and deleting it last. On Cloud Storage: `_publish_objects`."""
  if is_remote(out):
    _publish_objects(temporary, out, kind)
    return
  if temporary.is_file() or not _exists(out):
    os.replace(temporary, out)
    return
  replaced = out.parent / f'.{out.name}.replaced-{os.getpid()}'
  os.rename(out, replaced)
  os.rename(temporary, out)
  remove(replaced)


def _publish_objects(temporary, out, kind):
  """Copies the objects of `temporary` under `out`, the kind's manifest last, and removes
  `temporary`; an old `out` first loses its manifest, then the rest."""
  if not kind.is_directory:
    _copy_objects(temporary, out, None)
  else:
    if out.exists():
      remove(out / kind.manifest)
      remove(out)
    names = files_under(temporary)
    _copy_objects(temporary, out, [name for name in names if name != kind.manifest])
    _copy_objects(temporary, out, [kind.manifest])
  remove(temporary)


@contextlib.contextmanager
def replacing(out, kind, *, overwrite, sources=(), shared=False, publish=True):
  """Yields the path to write the `kind` output into (an empty directory, or for a file kind a
  path to create); when the block ends without an error that path takes `out`'s place, an old
  `out` being replaced only then. `check_output` runs before the block and again before the swap.

  On an error or a Ctrl-C the partial output is removed. shared: the processes of one
  multi-process export write into the same directory (it is neither emptied first nor removed on
  failure); only the one with `publish` swaps it in.
  """
  out = path(out)
  check_output(out, kind, overwrite=overwrite, sources=sources)
  temporary = temporary_path(out)
  if not shared:
    remove(temporary)  # left by an interrupted run of ours
  if is_remote(out):
    check_bucket(out)  # an object store has no directories to make
  elif kind.is_directory:
    temporary.mkdir(parents=True, exist_ok=shared)
  else:
    temporary.parent.mkdir(parents=True, exist_ok=True)
  discard = (lambda: None) if shared else (lambda: remove(temporary))
  with interrupt.cleanup(discard):
    try:
      yield temporary
    except BaseException:
      discard()
      raise
    if publish:
      check_output(out, kind, overwrite=overwrite, sources=sources)
      _swap(temporary, out, kind)
