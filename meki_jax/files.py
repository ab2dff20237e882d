"""Small-file writes that are atomic (temp + rename) and honour the umask like any other output."""

import os
import tempfile


def umask_mode(mode=0o666):
  """`mode` less the process' umask: what open() would have given a new file."""
  mask = os.umask(0)
  os.umask(mask)
  return mode & ~mask


def write_atomically(path, text, prefix=None):
  """Writes `text` to `path` through a temporary file in the same directory and a rename.

  mkstemp creates files 0600; the file gets the umask's mode before it is renamed into place.
  """
  directory = os.path.dirname(os.path.abspath(path))
  prefix = prefix or f'.{os.path.basename(path)}.'
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
