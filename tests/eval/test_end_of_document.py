"""Document ends in packed evaluation rows (meki_jax/eval/end_of_document.py)."""

import numpy as np
import pytest

from configs import base
from meki_jax.data import pipeline
from meki_jax.data.shards import ShardWriter
from meki_jax.eval.end_of_document import document_ends

EOD = base.QWEN3_EOD_ID


@pytest.mark.parametrize('packing, second_start', [('documents', 3), ('stream', 4)])
def test_document_ends_are_the_eod_targets_with_their_documents(tmp_path, packing, second_start):
  """Two documents packed in one row, then padding: each end is found with its own start
  ('stream' rows hold the first document's EOD as an input before the second)."""
  with ShardWriter(str(tmp_path / 'docs.array_record')) as writer:
    writer.write(np.array([11, 12, 13, EOD], np.int64))
    writer.write(np.array([21, 22, 23, 24, EOD], np.int64))
  config = base.get_config().data
  config.update(seq_len=12, eval_sources=[dict(path=str(tmp_path / '*'))], packing=packing)
  (batch,) = list(pipeline.make_eval_dataset(config, global_batch_size=1))
  ends = document_ends(batch, EOD)
  assert ends == [(0, 0, 2), (0, second_start, second_start + 3)]
  assert [list(batch['inputs'][row, start:t + 1]) for row, start, t in ends] == [
      [11, 12, 13], [21, 22, 23, 24]]  # the prompts: each document without its EOD
