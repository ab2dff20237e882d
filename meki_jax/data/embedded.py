"""The embedded default corpus: the Python standard library's sources, on every machine.

`embedded_shards('python-stdlib', tokenizer)` tokenises the running interpreter's stdlib `.py`
files (sorted, test suites excluded, one document per file) once into an ArrayRecord shard under
~/.cache/meki_jax (or $MEKI_JAX_CACHE) and returns its path. The shard is written atomically, so
an interrupted first run leaves no half-built corpus behind.
"""

import hashlib
import os
import pathlib
import sys
import sysconfig
import time

from meki_jax.data.shards import SUFFIX, ShardWriter

EMBEDDED_PREFIX = 'embedded:'
CORPORA = ('python-stdlib',)
_SKIPPED_PARTS = {'site-packages', 'dist-packages', 'test', 'tests', 'idlelib', 'turtledemo'}


def stdlib_files():
  """The stdlib's .py files in sorted order (the corpus' document order)."""
  root = pathlib.Path(sysconfig.get_paths()['stdlib'])
  return sorted(path for path in root.rglob('*.py')
                if not _SKIPPED_PARTS.intersection(path.relative_to(root).parts))


def cache_dir():
  return pathlib.Path(os.environ.get('MEKI_JAX_CACHE', '~/.cache/meki_jax')).expanduser()


def embedded_shards(name, tokenizer):
  """'python-stdlib' -> [path of its token shard], building the shard on first use."""
  if name not in CORPORA:
    raise ValueError(f'unknown embedded corpus {EMBEDDED_PREFIX}{name}; known: {CORPORA}')
  files = stdlib_files()
  fingerprint = hashlib.sha256('\n'.join(
      [sys.version, tokenizer.name] + [f'{f}:{f.stat().st_size}' for f in files]).encode())
  path = cache_dir() / f'{name}-{fingerprint.hexdigest()[:16]}{SUFFIX}'
  if path.exists():
    return [str(path)]
  path.parent.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  print(f'building the embedded corpus {name} ({len(files)} files) into {path} ...',
        file=sys.stderr, flush=True)
  with ShardWriter(path) as writer:
    for file in files:
      text = file.read_text(encoding='utf-8', errors='replace')
      token_ids = tokenizer.encode(text)
      if token_ids:
        writer.write(token_ids + [tokenizer.eod_id])
  print(f'  {writer.documents} documents, {writer.tokens:,} tokens in '
        f'{time.perf_counter() - start:.1f} s', file=sys.stderr, flush=True)
  return [str(path)]
