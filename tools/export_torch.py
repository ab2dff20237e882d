"""Exports a folded model for on-device inference: torch.export programs and an ExecuTorch .pte.

  python tools/export_torch.py --memory=exports/quickstart --out=exports/quickstart-device \
      [--cache_len=2048] [--batch=1] [--no_executorch] [--overwrite]

--memory is the directory tools/export_memory.py wrote; it is validated (config, manifest,
shard shapes and dtypes, checksums, vocabulary) before anything is traced. Writes prefill.pt2
(2..cache_len tokens), decode.pt2 (one token), model.pte (both as methods, XNNPACK on CPU) and
device.json (inputs, outputs, shapes, and each program's size and sha256 bound to the
sha256 of --memory's manifest.json: run_device.py refuses programs of another export or damaged). The folded tables stay in --memory: the application
gathers each token's rows from them and passes them as the `memory_rows` input. --overwrite
replaces only a device export, once the new one is complete, and never --memory or a directory
inside or around it.
Needs only torch, tensorstore and safetensors (and executorch for the .pte), not jax.
"""

from meki_jax import cli

cli.start(__name__)  # before torch is imported: Ctrl-C is one line from here on

from meki_jax.extras import require_extra  # noqa: E402

require_extra('device', 'torch')
from meki_jax.export import to_device  # noqa: E402  (after the check for torch)


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--memory', required=True, help='an export directory (export_memory.py)')
  parser.add_argument('--out', required=True, help='the directory to create')
  parser.add_argument('--cache_len', type=int, default=2048, help='KV cache slots')
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--no_executorch', action='store_true', help='skip the .pte')
  parser.add_argument('--overwrite', action='store_true', help='replace an existing --out')
  args = parser.parse_args()
  device = to_device.write_device_export(args.memory, args.out, cache_len=args.cache_len,
                                         batch=args.batch, executorch=not args.no_executorch,
                                         overwrite=args.overwrite)
  files = ', '.join(f'{record["file"]} ({record["bytes"]:,} B)'
                    for record in device['files'].values())
  print(f'{args.out}: {files}, cache_len {device["cache_len"]}, bound to {args.memory}')


if __name__ == '__main__':
  cli.run(main)
