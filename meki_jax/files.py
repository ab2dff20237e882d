"""Writes that lose nothing: small files atomically, outputs written beside and then swapped in.

`write_atomically` writes a small file through a temporary file and a rename, with the umask's
mode. `replacing(out, kind, ...)` is how every tool writes its output (a memory export, a device
bundle, token shards, a host-memory table): into `.<name>.partial` beside `out`, which takes
`out`'s place only once it is complete, so a failed or interrupted run leaves an old `out` as it
was. Before anything is written, `check_output` refuses an `out` that is, contains or lies inside
a source the command reads, and lets --overwrite replace only an output of the same kind that
meki-jax wrote (recognised by its manifest, or for a file by its first bytes): never a source,
never a directory of someone else's files.

The filesystem calls on a user's paths live here, so that one path layer can take them over.
"""

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import NamedTuple

from meki_jax import interrupt


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


def write_atomically(path, text, prefix=None):
  """Writes `text` to `path` through a temporary file in the same directory and a rename.

  mkstemp creates files 0600; the file gets the umask's mode before it is renamed into place.
  """
  directory = os.path.dirname(os.path.abspath(path))
  prefix = prefix or f'.{os.path.basename(path)}.'
  with naming(path):
    descriptor, temporary = tempfile.mkstemp(dir=directory, prefix=prefix, suffix='.tmp')
    try:
      with os.fdopen(descriptor, 'w', encoding='utf-8') as stream:
        stream.write(text)
        stream.flush()
        os.fsync(stream.fileno())
      os.chmod(temporary, umask_mode())
      os.replace(temporary, path)
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

  def recognises(self, path):
    path = pathlib.Path(path)
    try:
      if not self.is_directory:
        with open(path, 'rb') as stream:
          return stream.read(len(self.magic)) == self.magic
      record = json.loads((path / self.manifest).read_text(encoding='utf-8'))
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
  out = pathlib.Path(out).absolute()
  return out.parent / f'.{out.name}.partial'


def _overlap(out, source):
  """How `out` overlaps the input `source`, as the start of a sentence, or None (symlinks
  resolved)."""
  out, source = pathlib.Path(out).resolve(), pathlib.Path(source).resolve()
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
  out = pathlib.Path(out)
  if not (out.exists() or out.is_symlink()):
    return
  if not overwrite:
    raise FileExistsError(f'{out} exists; pass --overwrite to replace it')
  if not kind.recognises(out):
    raise FileExistsError(f'{out} exists and is not a {kind.what} ({kind.missing_mark()}): '
                          f'--overwrite replaces only a {kind.what}; move it away or choose '
                          'another path')


def _remove(path):
  if path.is_dir() and not path.is_symlink():
    shutil.rmtree(path, ignore_errors=True)
  else:
    path.unlink(missing_ok=True)


def _swap(temporary, out):
  """`temporary` takes `out`'s place: a file by one rename; a directory by renaming an old `out`
  aside first and deleting it last."""
  if temporary.is_file() or not (out.exists() or out.is_symlink()):
    os.replace(temporary, out)
    return
  replaced = out.parent / f'.{out.name}.replaced-{os.getpid()}'
  os.rename(out, replaced)
  os.rename(temporary, out)
  _remove(replaced)


@contextlib.contextmanager
def replacing(out, kind, *, overwrite, sources=(), shared=False, publish=True):
  """Yields the path to write the `kind` output into (an empty directory, or for a file kind a
  path to create); when the block ends without an error that path takes `out`'s place, an old
  `out` being replaced only then. `check_output` runs before the block and again before the swap.

  On an error or a Ctrl-C the partial output is removed. shared: the processes of one
  multi-process export write into the same directory (it is neither emptied first nor removed on
  failure); only the one with `publish` swaps it in.
  """
  out = pathlib.Path(out).absolute()
  check_output(out, kind, overwrite=overwrite, sources=sources)
  temporary = temporary_path(out)
  if not shared:
    _remove(temporary)  # left by an interrupted run of ours
  if kind.is_directory:
    temporary.mkdir(parents=True, exist_ok=shared)
  else:
    temporary.parent.mkdir(parents=True, exist_ok=True)
  discard = (lambda: None) if shared else (lambda: _remove(temporary))
  with interrupt.cleanup(discard):
    try:
      yield temporary
    except BaseException:
      discard()
      raise
    if publish:
      check_output(out, kind, overwrite=overwrite, sources=sources)
      _swap(temporary, out)
