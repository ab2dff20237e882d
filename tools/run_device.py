"""Runs the exported on-device programs: greedy text from a prompt, the way an app would.

  python tools/run_device.py --memory=exports/quickstart --device=exports/quickstart-device \
      --prompt="def parse_args(" [--runtime=pte|pt2] [--max_new_tokens=32]
  python tools/run_device.py ... --token_ids=9707,1879     # ids instead of text

--memory is export_memory.py's directory (manifest, backbone, memory.zarr), --device is
export_torch.py's (model.pte, prefill.pt2, decode.pt2, device.json). The KV cache lives inside
the programs; a token's table rows are read by id from memory.zarr before each call and passed
in (the programs dequantize int8/int4 tables). Prints the generated token ids and, with the
manifest's tokenizer, the text. Before anything runs, the bundle is checked
(device_runtime.read_device_export): device.json must be unedited, name --memory's manifest.json
(its sha256) and its table scheme, and every program must have the size and sha256 it records;
otherwise it exits naming the file. Imports torch, tensorstore and executorch; not jax.
"""

from meki_jax import cli

cli.start(__name__)  # before torch is imported: Ctrl-C is one line from here on

from meki_jax.extras import require_extra  # noqa: E402

require_extra('device', 'torch')
import torch  # noqa: E402  (after the check for it)
from tqdm import tqdm  # noqa: E402

from meki_jax.export import device_runtime, memory_store, to_device  # noqa: E402

PROGRESS_MIN_TOKENS = 8  # a progress bar for longer generations


def generate(session, prompt_ids, max_new_tokens, eod_id):
  """Greedy continuation of prompt_ids (a list) until eod_id or max_new_tokens; a list of ids."""
  prompt = torch.tensor([prompt_ids])
  if len(prompt_ids) >= to_device.MIN_PREFILL:
    logits = session.prefill(prompt)[:, -1]  # [1, vocab]
  else:
    logits = session.decode(prompt[:, 0])
  new_ids = []
  progress = tqdm(total=max_new_tokens, desc='generate', unit='token',
                  disable=max_new_tokens <= PROGRESS_MIN_TOKENS)
  while len(new_ids) < max_new_tokens:
    token = int(logits[0].argmax())
    if token == eod_id:
      break
    new_ids.append(token)
    progress.update()
    if len(new_ids) < max_new_tokens:
      logits = session.decode(torch.tensor([token]))
  progress.close()
  return new_ids


def main():
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--memory', required=True, help="export_memory.py's directory")
  parser.add_argument('--device', required=True, help="export_torch.py's directory")
  parser.add_argument('--prompt', help='prompt text (tokenised with the manifest\'s tokenizer)')
  parser.add_argument('--token_ids', help='comma-separated prompt ids, instead of --prompt')
  parser.add_argument('--runtime', choices=('pte', 'pt2'), default='pte')
  parser.add_argument('--max_new_tokens', type=int, default=32)
  args = parser.parse_args()
  if (args.prompt is None) == (args.token_ids is None):
    parser.error('pass exactly one of --prompt and --token_ids')

  # the bundle first: programs of another export, or damaged, are refused
  device, prefill, decode = device_runtime.device_runners(args.device, args.memory, args.runtime)
  manifest, memory = memory_store.open_export(args.memory)
  vocabulary = manifest.get('vocabulary') or {}
  tokenizer = None
  if vocabulary.get('tokenizer'):
    from meki_jax.data.tokenizer import load_tokenizer
    tokenizer = load_tokenizer(vocabulary['tokenizer'])
  if args.prompt is not None:
    if tokenizer is None:
      parser.error(f'{args.memory}/manifest.json names no tokenizer: pass --token_ids')
    prompt_ids = tokenizer.encode(args.prompt)
  else:
    prompt_ids = [int(token) for token in args.token_ids.split(',')]
  if not prompt_ids:
    parser.error('the prompt is empty')
  vocab_size = manifest['model_config']['vocab_size']
  if not all(0 <= token < vocab_size for token in prompt_ids):
    parser.error(f'prompt ids {prompt_ids} must lie in [0, {vocab_size})')
  if len(prompt_ids) + args.max_new_tokens > device['cache_len']:
    parser.error(f'{len(prompt_ids)} prompt + {args.max_new_tokens} new tokens exceed the '
                 f'programs\' cache_len={device["cache_len"]}')

  session = device_runtime.Session(memory, prefill, decode, device['cache_len'])
  new_ids = generate(session, prompt_ids, args.max_new_tokens, vocabulary.get('eod_id'))
  print('ids:', ','.join(map(str, new_ids)))
  if tokenizer is not None:
    print('text:', (args.prompt or tokenizer.decode(prompt_ids)) + tokenizer.decode(new_ids))


if __name__ == '__main__':
  cli.run(main)
