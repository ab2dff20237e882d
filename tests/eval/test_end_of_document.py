"""Document ends in packed evaluation rows (meki_jax/eval/end_of_document.py)."""

import numpy as np

from configs import base
from meki_jax.data import pipeline
from meki_jax.data.shards import ShardWriter
from meki_jax.eval.end_of_document import document_ends

EOD = base.QWEN3_EOD_ID


def test_document_ends_are_the_eod_targets_with_their_segments(tmp_path):
  """Two documents packed in one row, then padding: each end is found with its own start,
  for both attention switches (segment ids per document or one per row)."""
  with ShardWriter(str(tmp_path / 'docs.array_record')) as writer:
    writer.write(np.array([11, 12, 13, EOD], np.int64))
    writer.write(np.array([21, 22, 23, 24, EOD], np.int64))
  for per_document in (True, False):
    config = base.get_config().data
    config.update(seq_len=12, eval_sources=[dict(path=str(tmp_path / '*'))],
                  attention_per_document=per_document)
    (batch,) = list(pipeline.make_eval_dataset(config, global_batch_size=1))
    ends = document_ends(batch, EOD)
    assert ends == [(0, 0, 2), (0, 3, 6)]
    assert [list(batch['inputs'][row, start:t + 1]) for row, start, t in ends] == [
        [11, 12, 13], [21, 22, 23, 24]]  # the prompts: each document without its EOD
