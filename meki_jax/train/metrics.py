"""Where metrics go: a JSON-lines file and TensorBoard event files in the workdir (process 0)."""

import json
import os

import jax

from meki_jax import files


class MetricWriter:
  """Appends {'step': s, **metrics} to <workdir>/metrics.jsonl and TensorBoard scalars.

  `start_step`: the step training (re)starts from. Records of later steps, written by a run that
  was stopped after its last checkpoint, are dropped first, so every step appears once.
  """

  def __init__(self, workdir, start_step=0):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    drop_records_after(workdir, start_step)
    self._path = os.path.join(workdir, 'metrics.jsonl')
    self._jsonl = open(self._path, 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, metrics):
    if not self._enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
    with files.naming(self._path):  # a full disk names the file
      self._jsonl.write(json.dumps(record) + '\n')
      self._jsonl.flush()
    for name, value in metrics.items():
      self._tensorboard.add_scalar(name, float(value), int(step))

  def close(self):
    if self._enabled:
      self._jsonl.close()
      self._tensorboard.close()


def read_metrics(workdir):
  """The records of <workdir>/metrics.jsonl, in order."""
  with open(os.path.join(workdir, 'metrics.jsonl'), encoding='utf-8') as lines:
    return [json.loads(line) for line in lines if line.strip()]


def drop_records_after(workdir, step):
  """Rewrites <workdir>/metrics.jsonl (atomically) without the records of steps after `step`
  and without a half-written last line. Returns how many lines were dropped."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return 0
  with open(path, encoding='utf-8') as stream:
    lines = [line for line in stream if line.strip()]
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue  # cut off by a kill mid-write
    if isinstance(record, dict) and record.get('step', 0) <= step:
      kept.append(line if line.endswith('\n') else line + '\n')
  if len(kept) < len(lines):
    files.write_atomically(path, ''.join(kept))
  return len(lines) - len(kept)
