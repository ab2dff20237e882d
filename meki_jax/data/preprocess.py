"""Raw corpora -> token shards, tokenised and written by parallel worker processes.

`preprocess(inputs, output)` splits the inputs into pieces (a JSON-lines file, a Parquet row
group, `shard_documents` text files or Megatron documents) and a pool of worker processes turns
each piece into one shard `output/shard-NNNNN-of-MMMMM.array_record`: a record per document, its
token ids followed by the end-of-document id (Megatron documents keep theirs, or get one). Empty
documents are skipped. The shards go to a temporary directory that is renamed to `output` once
all are written, so an interrupted run leaves no partial output; an existing `output` is
replaced only with overwrite=True, and only if it is a shard directory of ours (its
summary.json says so: SHARDS) that holds none of the inputs (files.replacing). Shard order and
contents do not depend on the worker count. Worker processes ignore Ctrl-C: the program's own
handler stops them (meki_jax/interrupt.py).
"""

import dataclasses
import functools
import glob
import json
import multiprocessing
import os
import signal
import sys
import time

import numpy as np
from tqdm import tqdm

from meki_jax import files
from meki_jax.data import megatron, sources
from meki_jax.data.shards import SUFFIX, ShardWriter
from meki_jax.data.tokenizer import load_tokenizer

SUMMARY_FILE = 'summary.json'
SHARDS = files.Kind('token-shard directory', manifest=SUMMARY_FILE, format='meki-shards')


@dataclasses.dataclass(frozen=True)
class Piece:
  """One shard's input: `files` in `format`; `part` is a Parquet row group index or a Megatron
  document range (start, stop)."""
  format: str
  files: tuple
  part: object = None


@dataclasses.dataclass
class Counts:
  documents: int = 0
  tokens: int = 0  # including each document's end-of-document id
  skipped: int = 0  # empty documents

  def add(self, other):
    self.documents += other.documents
    self.tokens += other.tokens
    self.skipped += other.skipped


@dataclasses.dataclass(frozen=True)
class Summary:
  output: str
  shards: int
  documents: int
  tokens: int
  skipped: int
  seconds: float

  @property
  def tokens_per_second(self):
    return self.tokens / max(self.seconds, 1e-9)

  def __str__(self):
    return (f'{self.documents:,} documents, {self.tokens:,} tokens in {self.shards} shards, '
            f'{self.seconds:.1f} s ({self.tokens_per_second:,.0f} tokens/s); '
            f'{self.skipped:,} empty documents skipped -> {self.output}')


def expand_inputs(patterns):
  """Globs -> sorted unique paths. A Megatron dataset may be named by its prefix (no suffix)."""
  paths = set()
  for pattern in patterns:
    matches = glob.glob(os.path.expanduser(pattern)) or glob.glob(
        os.path.expanduser(pattern) + '.idx')
    if not matches:
      raise FileNotFoundError(f'input {pattern!r} matches no file')
    paths.update(path for path in matches if os.path.isfile(path))
  return sorted(paths)


def plan_pieces(paths, *, input_format='auto', text_field='text', text_split='file',
                shard_documents=100_000):
  """Input paths -> [Piece] in a fixed order, the order of the output shards.

  Opens every Parquet file and Megatron index once, so a missing column or a truncated index
  fails here, before any worker starts.
  """
  if input_format != 'auto' and input_format not in sources.FORMATS:
    raise ValueError(f'input format {input_format!r} is not auto or one of {sources.FORMATS}')
  if text_split not in sources.TEXT_SPLITS:
    raise ValueError(f'text split {text_split!r} is not one of {sources.TEXT_SPLITS}')
  pieces, text_files, prefixes = [], [], set()
  for path in paths:
    file_format = sources.detect_format(path) if input_format == 'auto' else input_format
    if file_format == 'jsonl':
      pieces.append(Piece('jsonl', (path,)))
    elif file_format == 'parquet':
      row_groups = sources.parquet_row_groups(path, text_field)
      pieces.extend(Piece('parquet', (path,), group) for group in range(row_groups))
    elif file_format == 'megatron':
      prefix = megatron.dataset_prefix(path)
      if prefix not in prefixes:  # x.bin and x.idx are one dataset
        prefixes.add(prefix)
        documents = len(megatron.MegatronDataset(prefix))
        for start in range(0, documents, shard_documents):
          stop = min(start + shard_documents, documents)
          pieces.append(Piece('megatron', (prefix,), (start, stop)))
    else:
      text_files.append(path)
  if text_split == 'file':
    pieces.extend(Piece('text', tuple(text_files[start:start + shard_documents]))
                  for start in range(0, len(text_files), shard_documents))
  else:
    pieces.extend(Piece('text', (path,)) for path in text_files)
  return pieces


@functools.lru_cache(maxsize=2)
def _tokenizer(name):
  return load_tokenizer(name)


def _texts(piece, text_field, text_split):
  if piece.format == 'jsonl':
    return sources.read_jsonl(piece.files[0], text_field)
  if piece.format == 'parquet':
    return sources.read_parquet(piece.files[0], piece.part, text_field)
  return sources.read_text(piece.files, text_split)


def _megatron_documents(piece, tokenizer):
  """A Megatron piece's documents, each ending with the end-of-document id."""
  dataset = megatron.MegatronDataset(piece.files[0])
  for document in range(*piece.part):
    token_ids = dataset[document]
    if len(token_ids) == 0:
      yield token_ids
      continue
    if token_ids.min() < 0 or token_ids.max() >= tokenizer.vocab_size:
      raise ValueError(f'{dataset.data_path}: document {document} has token ids outside '
                       f'[0, {tokenizer.vocab_size}) of tokenizer {tokenizer.name}: was it made '
                       'with another tokenizer?')
    if token_ids[-1] != tokenizer.eod_id:
      token_ids = np.append(token_ids, tokenizer.eod_id)
    yield token_ids


def _documents(piece, tokenizer, text_field, text_split):
  """A piece's documents as token ids ending with the end-of-document id ([] if empty)."""
  if piece.format == 'megatron':
    yield from _megatron_documents(piece, tokenizer)
    return
  for text in _texts(piece, text_field, text_split):
    yield tokenizer.encode(text) + [tokenizer.eod_id] if text.strip() else []


def convert_piece(task, *, tokenizer_name, text_field, text_split):
  """task = (piece, shard path): writes the piece's documents to the shard. Returns Counts."""
  piece, shard_path = task
  tokenizer = _tokenizer(tokenizer_name)
  skipped = 0
  with ShardWriter(shard_path) as writer:
    for token_ids in _documents(piece, tokenizer, text_field, text_split):
      if len(token_ids):
        writer.write(token_ids)
      else:
        skipped += 1
  return Counts(writer.documents, writer.tokens, skipped)


def shard_name(index, count):
  return f'shard-{index:05d}-of-{count:05d}{SUFFIX}'


def _collect(results, count, progress):
  """Sums the Counts of `count` results, showing a progress bar."""
  total = Counts()
  with tqdm(total=count, unit='shard', desc='preprocess', disable=not progress,
            file=sys.stderr) as bar:
    for counts in results:
      total.add(counts)
      bar.update(1)
      bar.set_postfix(documents=f'{total.documents:,}', tokens=f'{total.tokens:,}')
  return total


def _convert_all(pieces, directory, convert, num_workers, progress):
  """Runs `convert` on every (piece, shard path), in `num_workers` processes if > 1."""
  tasks = [(piece, str(directory / shard_name(index, len(pieces))))
           for index, piece in enumerate(pieces)]
  if num_workers > 1 and len(tasks) > 1:
    with multiprocessing.get_context('spawn').Pool(
        min(num_workers, len(tasks)), initializer=signal.signal,
        initargs=(signal.SIGINT, signal.SIG_IGN)) as pool:
      return _collect(pool.imap_unordered(convert, tasks), len(tasks), progress)
  return _collect(map(convert, tasks), len(tasks), progress)


def preprocess(inputs, output, *, tokenizer='qwen3', input_format='auto', text_field='text',
               text_split='file', shard_documents=100_000, num_workers=1, overwrite=False,
               progress=True):
  """Tokenises `inputs` (globs) into the shard directory `output`. Returns a Summary.

  Writes `output/summary.json` (counts, tokenizer, end-of-document id, inputs) beside the shards;
  train on them with data.train_sources=[dict(path='<output>/*.array_record')].
  """
  if shard_documents < 1:
    raise ValueError(f'shard_documents={shard_documents} must be >= 1')
  start = time.perf_counter()
  paths = expand_inputs(inputs)
  files.check_output(output, SHARDS, overwrite=overwrite, sources=paths)  # before any work
  eod_id = _tokenizer(tokenizer).eod_id  # fails early on a bad tokenizer name
  pieces = plan_pieces(paths, input_format=input_format, text_field=text_field,
                       text_split=text_split, shard_documents=shard_documents)
  if not pieces:
    raise ValueError(f'inputs {list(inputs)} hold no documents')
  with files.replacing(output, SHARDS, overwrite=overwrite, sources=paths) as directory:
    convert = functools.partial(convert_piece, tokenizer_name=tokenizer, text_field=text_field,
                                text_split=text_split)
    counts = _convert_all(pieces, directory, convert, num_workers, progress)
    summary = Summary(str(output), len(pieces), counts.documents, counts.tokens, counts.skipped,
                      time.perf_counter() - start)
    record = dict(dataclasses.asdict(summary), format=SHARDS.format, tokenizer=tokenizer,
                  eod_id=eod_id, inputs=paths)
    (directory / SUMMARY_FILE).write_text(json.dumps(record, indent=1) + '\n')
  return summary
