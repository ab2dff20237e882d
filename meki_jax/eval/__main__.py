"""lm-eval's command line with the model 'meki_jax' registered (spec section 7's ten tasks):

  TASKS=arc_easy,arc_challenge,boolq,copa,hellaswag,lambada_openai,openbookqa,piqa,sciq,winogrande
  python -m meki_jax.eval --model meki_jax --batch_size 8 --tasks $TASKS \
      --model_args workdir=runs/quickstart,config=configs/quickstart.py

Every other flag is lm-eval's own (`--limit`, `--output_path`, `--include_path`, ...). Errors of
the meki_jax model (a missing workdir, a damaged checkpoint) are one line (meki_jax/cli.py).
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

from meki_jax.extras import require_extra  # noqa: E402

require_extra('eval', 'lm_eval')
from lm_eval.__main__ import cli_evaluate  # noqa: E402  (after the check for lm_eval)

from meki_jax.eval import lm_eval_adapter  # noqa: E402,F401  (registers 'meki_jax')

if __name__ == '__main__':
  cli.run(cli_evaluate)
