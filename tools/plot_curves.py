"""Plots a metric (default: validation loss) of several runs against the step, to a PNG.

  python tools/plot_curves.py runs/repro/dense runs/repro/meki [label=DIR ...] \
      --out docs/repro_eval_loss.png [--metric eval_loss] [--tokens_per_step 4096]

Reads each workdir's metrics.jsonl (a resumed run may log a step twice: the last record wins),
prints the final value of every run and writes the plot.
"""

from meki_jax import cli

cli.start(__name__)  # Ctrl-C is one line from here on

import os  # noqa: E402

import matplotlib  # noqa: E402

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402

from meki_jax.train.metrics import read_metrics  # noqa: E402


def metric_curve(workdir, metric):
  """Sorted (steps, values) of `metric` in a workdir's metrics.jsonl; the last record per step."""
  by_step = {r['step']: r[metric] for r in read_metrics(workdir) if metric in r}
  if not by_step:
    raise ValueError(f'{workdir}/metrics.jsonl has no {metric!r} records')
  steps = sorted(by_step)
  return steps, [by_step[step] for step in steps]


def parse_run(argument):
  """'label=DIR' or 'DIR' (labelled by its base name) -> (label, DIR)."""
  label, sep, path = argument.partition('=')
  if not sep:
    label, path = os.path.basename(os.path.normpath(argument)), argument
  return label, path


def main():
  parser = cli.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('runs', nargs='+', help='workdirs, optionally label=DIR')
  parser.add_argument('--out', required=True, help='PNG file to write')
  parser.add_argument('--metric', default='eval_loss')
  parser.add_argument('--tokens_per_step', type=int, default=0,
                      help='if set, the x axis is tokens (steps x this)')
  parser.add_argument('--title', default='')
  args = parser.parse_args()
  figure, axes = plt.subplots(figsize=(7, 4.5))
  for label, path in map(parse_run, args.runs):
    steps, values = metric_curve(path, args.metric)
    x = [step * args.tokens_per_step for step in steps] if args.tokens_per_step else steps
    axes.plot(x, values, marker='o', markersize=3, label=label)
    print(f'{label}: {args.metric} {values[-1]:.4f} at step {steps[-1]}')
  axes.set_xlabel('tokens' if args.tokens_per_step else 'step')
  axes.set_ylabel(args.metric)
  axes.set_title(args.title)
  axes.grid(alpha=0.3)
  axes.legend()
  figure.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  figure.savefig(args.out, dpi=120)
  print(f'wrote {args.out}')


if __name__ == '__main__':
  cli.run(main)
