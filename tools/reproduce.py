"""The small-scale reproduction: dense vs MeKi vs PLE vs Engram vs MeKi's ablations, on CPU.

  python tools/reproduce.py --out=runs/repro [--variants=dense,meki,...] [--steps=N] [--eval_every=50]
      [--flavor=paper|authors_release]

Trains every variant of configs/repro.py (same backbone, same data order, same number of
tokens) in its own process into <out>/<variant>, then prints a markdown table (parameters, final
validation loss, difference to dense, minutes) and plots the validation-loss curves to
<out>/eval_loss.png. A variant whose workdir already holds a finished run is not retrained, so an
interrupted reproduction continues where it stopped. `--flavor=authors_release` trains every
variant as the network of the authors' released code (spec section 6a); use its own --out.
"""

from meki_jax import cli

cli.start(__name__)  # Ctrl-C is one line from here on

import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

from configs import repro  # noqa: E402
from meki_jax.param_count import count_params  # noqa: E402
from meki_jax.train.errors import RunError  # noqa: E402
from meki_jax.train.metrics import read_metrics  # noqa: E402


def variant_arg(variant, flavor):
  """The configs/repro.py argument of a variant under a model flavor."""
  return variant if flavor == 'paper' else f'{variant},flavor={flavor}'


def _run(command):
  """Runs a command line of ours; RunError if it fails (it has said why on stderr)."""
  status = subprocess.run(command, check=False).returncode
  if status:
    raise RunError(f'{" ".join(command[1:])} ended with status {status} (its error is above)')


def train_variant(variant, workdir, steps, eval_every):
  """Runs the trainer for one variant; returns the wall-clock minutes (0: finished earlier)."""
  if os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    if any(r.get('step') == steps and 'eval_loss' in r for r in read_metrics(workdir)):
      return 0.0
  start = time.perf_counter()
  _run([sys.executable, '-m', 'meki_jax.train', f'--config=configs/repro.py:{variant}',
        f'--workdir={workdir}', f'--config.train.num_steps={steps}',
        f'--config.train.eval_every={eval_every}'])
  return (time.perf_counter() - start) / 60


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='runs/repro')
  parser.add_argument('--variants', default=','.join(repro.VARIANTS))
  parser.add_argument('--steps', type=int, default=repro.get_config().train.num_steps)
  parser.add_argument('--eval_every', type=int, default=50)
  parser.add_argument('--flavor', default='paper', choices=('paper', 'authors_release'))
  args = parser.parse_args()
  variants = args.variants.split(',')
  rows, finals = [], {}
  for variant in variants:
    workdir = os.path.join(args.out, variant)
    minutes = train_variant(variant_arg(variant, args.flavor), workdir, args.steps,
                            args.eval_every)
    config = repro.get_config(variant_arg(variant, args.flavor))
    counts = count_params(config.model)
    evals = {r['step']: r['eval_loss'] for r in read_metrics(workdir) if 'eval_loss' in r}
    finals[variant] = evals[max(evals)]
    rows.append((variant, counts, evals, minutes))
  tokens = args.steps * config.train.global_batch_size * config.data.seq_len
  print(f'\nflavor {args.flavor}: {args.steps} steps x {config.train.global_batch_size} x '
        f'{config.data.seq_len} = {tokens:,} training tokens per run')
  print('| variant | RAM | ROM | training total | eval loss (first -> last) | vs dense | minutes |')
  print('|---|---|---|---|---|---|---|')
  for variant, counts, evals, minutes in rows:
    delta = (f"{finals[variant] - finals['dense']:+.4f}" if 'dense' in finals else '')
    print(f"| {variant} | {counts['ram_params'] / 1e6:.2f}M | {counts['rom_params'] / 1e6:.2f}M "
          f"| {counts['train_total_params'] / 1e6:.2f}M | {evals[min(evals)]:.4f} -> "
          f"{finals[variant]:.4f} | {delta} | {f'{minutes:.1f}' if minutes else 'earlier'} |")
  _run([sys.executable, 'tools/plot_curves.py',
        *[f'{v}={os.path.join(args.out, v)}' for v in variants],
        '--out', os.path.join(args.out, 'eval_loss.png'),
        '--title', f'validation loss ({args.flavor}), {tokens:,} tokens per run'])


if __name__ == '__main__':
  cli.run(main)
