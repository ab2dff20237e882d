"""Where metrics go: a JSON-lines file and TensorBoard event files in the workdir (process 0)."""

import json
import os

import jax


class MetricWriter:
  """Appends {'step': s, **metrics} to <workdir>/metrics.jsonl and TensorBoard scalars."""

  def __init__(self, workdir):
    self._enabled = jax.process_index() == 0
    if not self._enabled:
      return
    from tensorboardX import SummaryWriter
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
    self._tensorboard = SummaryWriter(os.path.join(workdir, 'tensorboard'))

  def write(self, step, metrics):
    if not self._enabled:
      return
    record = {'step': int(step), **{k: float(v) for k, v in metrics.items()}}
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
