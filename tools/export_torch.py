"""Exports a folded model for on-device inference: an ExecuTorch .pte and torch.export programs.

  python tools/export_torch.py --memory=exports/quickstart --out=exports/quickstart-device \
      [--cache_len=2048] [--batch=1] [--formats=pte,pt2] [--qlinear=8da4w --group_size=32]
      [--qembedding=8w] [--logits=last|all] [--overwrite]

--memory is the directory tools/export_memory.py wrote; it is validated (config, manifest,
shard shapes and dtypes, checksums, vocabulary, table scheme) before anything is traced. Writes
model.pte (prefill and decode as two methods lowered for CPU with XNNPACK, sharing one KV cache
kept inside the program and updated in place), prefill.pt2 / decode.pt2 (the same programs for
torch.export) and device.json (signature, settings, and each program's size and sha256, bound
to --memory's manifest.json: run_device.py refuses programs of another export, damaged, or with
an edited device.json). --qlinear=8da4w quantizes every linear layer (the output projection
too) to int4 weights in groups of --group_size with int8 dynamic activations, --qembedding=8w
the embedding to int8 rows (torchao; what optimum-executorch's flags of the same names do). The
folded tables stay in --memory, stored in the scheme export_memory.py chose (--dtype): the
application reads each token's rows from them and passes them in; the programs dequantize.
--logits=last returns the last position's logits from prefill (what generation needs), all
every position's. --overwrite replaces only a device export, once the new one is complete, and
never --memory or a directory inside or around it. Needs torch, torchao, tensorstore,
safetensors and executorch, not jax.
"""

from meki_jax import cli

cli.start(__name__)  # before torch is imported: Ctrl-C is one line from here on

from meki_jax.extras import require_extra  # noqa: E402

require_extra('device', 'torch')
from meki_jax.export import device_model, to_device  # noqa: E402  (after the check for torch)


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--memory', required=True, help='an export directory (export_memory.py)')
  parser.add_argument('--out', required=True, help='the directory to create')
  parser.add_argument('--cache_len', type=int, default=2048, help='KV cache slots')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--formats', default='pte,pt2',
                      help=f'comma-separated, of {",".join(to_device.FORMATS)}')
  parser.add_argument('--qlinear', choices=device_model.QLINEAR, help='linear quantization')
  parser.add_argument('--group_size', type=int, default=32, help='--qlinear weights per scale')
  parser.add_argument('--qembedding', choices=device_model.QEMBEDDING,
                      help='embedding quantization')
  parser.add_argument('--logits', choices=device_model.LOGITS, default='last',
                      help="prefill's logits: the last position's or every position's")
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args()
  device = to_device.write_device_export(
      args.memory, args.out, cache_len=args.cache_len, batch=args.batch,
      formats=tuple(args.formats.split(',')), qlinear=args.qlinear, group_size=args.group_size,
      qembedding=args.qembedding, logits=args.logits, overwrite=args.overwrite)
  files = ', '.join(f'{record["file"]} ({record["bytes"]:,} B)'
                    for record in device['files'].values())
  print(f'{args.out}: {files}, cache_len {device["cache_len"]}, bound to {args.memory}')


if __name__ == '__main__':
  cli.run(main)
