"""Where metrics go: a JSON-lines file and TensorBoard event files in the workdir (process 0)."""

import json

import jax

from meki_jax import files

FILENAME = 'metrics.jsonl'


class MetricWriter:
  """Appends {'step': s, **metrics} to <workdir>/metrics.jsonl and TensorBoard scalars.

  `start_step`: the step training (re)starts from. Records of later steps, written by a run that
  was stopped after its last checkpoint, are dropped first, so every step appears once. A Cloud
  Storage object cannot be appended to: there the records are kept and metrics.jsonl is rewritten
  (one upload) at every write, and the TensorBoard event file at each of tensorboardX's flushes
  (`_EventObject`).
  """

  def __init__(self, workdir, start_step=0):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter, record_writer
    record_writer.register_writer_factory('gs', _EventObjects())  # through files, not its own
    workdir = files.make_directory(workdir)
    drop_records_after(workdir, start_step)
    self._path = workdir / FILENAME
    self._lines = _lines(self._path) if files.is_remote(workdir) else None
    self._jsonl = None if files.is_remote(workdir) else open(self._path, 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(str(workdir / 'tensorboard'))

  def write(self, step, metrics):
    if not self._enabled:
      return
    line = json.dumps({'step': int(step), **{k: float(v) for k, v in metrics.items()}}) + '\n'
    with files.naming(self._path):  # a full disk names the file
      if self._jsonl is None:
        self._lines.append(line)
        files.write_atomically(self._path, ''.join(self._lines))
      else:
        self._jsonl.write(line)
        self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def close(self):
    if self._enabled:
      if self._jsonl is not None:
        self._jsonl.close()
      self._tensorboard.close()


class _EventObject:
  """A TensorBoard event file on Cloud Storage, as tensorboardX's record writer uses it: the
  records are kept and the object is rewritten (one upload) at each flush that has new ones."""

  def __init__(self, location):
    self._path = files.path(location)
    self._records = bytearray()
    self._uploaded = 0

  def write(self, data):
    self._records += data

  def flush(self):
    if len(self._records) > self._uploaded:
      with files.naming(self._path), self._path.open('wb') as stream:
        stream.write(bytes(self._records))
      self._uploaded = len(self._records)

  def close(self):
    self.flush()


class _EventObjects:
  """tensorboardX's writer factory for gs:// event files (its own one uploads again when
  garbage-collected, after the run, and retries for 120 s if it cannot)."""

  def open(self, location):
    return _EventObject(location)

  def directory_check(self, location):
    del location  # an object store has no directories


def _lines(path):
  """The non-empty lines of a file, each ending with a newline ([] if there is no file)."""
  try:
    text = files.path(path).read_text(encoding='utf-8')
  except FileNotFoundError:
    return []
  return [line + '\n' for line in text.splitlines() if line.strip()]


def read_metrics(workdir):
  """The records of <workdir>/metrics.jsonl, in order."""
  text = (files.path(workdir) / FILENAME).read_text(encoding='utf-8')
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def drop_records_after(workdir, step):
  """Rewrites <workdir>/metrics.jsonl (atomically) without the records of steps after `step`
  and without a half-written last line. Returns how many lines were dropped."""
  path = files.path(workdir) / FILENAME
  lines = _lines(path)
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # cut off by a kill mid-write
    if isinstance(record, dict) and record.get('step', 0) <= step:
      kept.append(line)
  if len(kept) < len(lines):
    files.write_atomically(path, ''.join(kept))
  return len(lines) - len(kept)
