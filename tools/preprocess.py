"""Tokenises raw corpora into ArrayRecord token shards (one document per record, ending in EOD).

  python tools/preprocess.py --input='fineweb-edu/sample/10BT/*.parquet' --output=data/fineweb-edu
  python tools/preprocess.py --input='raw/*.jsonl.gz' --text_field=content --output=data/code
  python tools/preprocess.py --input='books/*.txt' --text_split=blank_lines --output=data/books
  python tools/preprocess.py --input=megatron/corpus_text_document --output=data/corpus

Formats come from the file names (--format overrides): .jsonl/.json/.ndjson (optionally .gz or
.zst), .parquet, a Megatron-LM dataset (prefix, .bin or .idx), anything else is text. An existing
--output is left untouched unless --overwrite. Train on the result with
--config.data.train_sources='({"path": "data/fineweb-edu/*.array_record", "weight": 1.0},)'.
"""

from meki_jax import cli

cli.start(__name__)  # before anything else is imported: Ctrl-C is one line from here on

import os  # noqa: E402

from absl import app, flags  # noqa: E402

from meki_jax.data import preprocess, sources  # noqa: E402

_INPUT = flags.DEFINE_multi_string('input', None, 'Input files (globs); repeat for more.')
_OUTPUT = flags.DEFINE_string('output', None, 'The shard directory to create.')
_FORMAT = flags.DEFINE_enum('format', 'auto', ['auto', *sources.FORMATS],
                            'Input format; auto = from each file name.')
_TEXT_FIELD = flags.DEFINE_string('text_field', 'text', 'JSON field / Parquet column of the text.')
_TEXT_SPLIT = flags.DEFINE_enum('text_split', 'file', list(sources.TEXT_SPLITS),
                                'Text files: a document per file or per blank-line-separated '
                                'block.')
_TOKENIZER = flags.DEFINE_string('tokenizer', 'qwen3', "'qwen3' or a tokenizer.json path.")
_NUM_WORKERS = flags.DEFINE_integer('num_workers', os.cpu_count(), 'Worker processes.')
_SHARD_DOCUMENTS = flags.DEFINE_integer(
    'shard_documents', 100_000, 'Documents per shard for text files and Megatron datasets '
    '(each JSON-lines file and Parquet row group is a shard).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --output.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  print(preprocess.preprocess(
      _INPUT.value, _OUTPUT.value, tokenizer=_TOKENIZER.value, input_format=_FORMAT.value,
      text_field=_TEXT_FIELD.value, text_split=_TEXT_SPLIT.value,
      shard_documents=_SHARD_DOCUMENTS.value, num_workers=_NUM_WORKERS.value,
      overwrite=_OVERWRITE.value))


if __name__ == '__main__':
  flags.mark_flags_as_required(['input', 'output'])
  cli.run_absl(main)
