"""Does a trained checkpoint end documents? (meki_jax/eval/end_of_document.py)

  python tools/eod_check.py --workdir=runs/repro-paper/meki [--documents=32] [--max_new_tokens=32]

Prints, over the first --documents ends of held-out documents (config.data's eval stream): the
mean probability of EOD at a document's true end and at every other position, the share of ends
where EOD is the greedy token, and the share of greedy continuations of each document's last
tokens (up to seq_len of them) that stop at EOD within --max_new_tokens.
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

import json  # noqa: E402

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from meki_jax import decode, run_config  # noqa: E402
from meki_jax.config import validate  # noqa: E402
from meki_jax.data.pipeline import make_eval_dataset  # noqa: E402
from meki_jax.eval.end_of_document import end_of_document_report  # noqa: E402
from meki_jax.eval.scoring import restore_params  # noqa: E402
from meki_jax.model.transformer import build_model  # noqa: E402

_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir (its latest checkpoint).',
                               required=True)
_DOCUMENTS = flags.DEFINE_integer('documents', 32, 'Held-out document ends to check.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 32, 'Greedy tokens per continuation.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)
  config = validate(run_config.load(_WORKDIR.value))
  params, _ = restore_params(config, _WORKDIR.value)
  model = build_model(config.model)
  forward = jax.jit(lambda inputs, positions, segments: model.apply(
      {'params': params}, inputs, positions, segments))
  decoder = (build_model(config.model, decode=True), decode.decode_params(params, config.model))
  batches = make_eval_dataset(config.data, global_batch_size=config.train.global_batch_size)
  report = end_of_document_report(forward, decoder, batches, config.data.eod_id,
                                  max_documents=_DOCUMENTS.value,
                                  max_new_tokens=_MAX_NEW_TOKENS.value)
  print(json.dumps({'workdir': _WORKDIR.value, **report}, indent=2))


if __name__ == '__main__':
  cli.run_absl(main)
