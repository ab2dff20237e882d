"""On-device programs side by side: optimum-executorch's Qwen3-0.6B against our dense-0.6B and
MeKi-0.6B programs, same quantization, one run, interleaved.

  python benchmarks/device_decode.py --work_dir=/tmp/device-bench [--contexts=1024,8192]
      [--steps=64] [--rounds=3] [--prefill=512] [--chunk=1024] [--group_size=32]
      [--huge_pages=on|off]

Builds, once per --work_dir (kept for later runs; each artefact is verified when loaded):
  qwen3-0.6b/    a Hugging Face Qwen3-0.6B of the real shape and config (28 layers, d 1024,
                 16/8 heads, vocabulary 151,936, tied embeddings, rope_theta 10^6) with random
                 weights, saved with transformers: nothing is downloaded
  peer/model.pte optimum-executorch's export of it, run from its own virtual environment
                 (peer-venv/: optimum-executorch==1.1.0, torch==2.13.0, executorch==1.5.1):
                 `optimum-cli export executorch --recipe xnnpack --use_custom_sdpa
                 --use_custom_kv_cache --qlinear 8da4w --qembedding 8w --max_seq_len N`
  dense/, dense-device/   the same weights through our converter (convert/hf_qwen3.py, the
                 vocabulary cut to 151,680 rows), export_folded and export_torch with 8da4w
                 linears (group --group_size) and an 8-bit embedding
  meki/, meki-device/     MeKi-0.6B: that backbone plus a random MeKi branch (d_mem 128),
                 folded into int8 tables (a float16 scale per token and layer), same programs
Then, for each of --rounds rounds, one fresh worker process per program loads it (glibc's
malloc asking for transparent huge pages unless --huge_pages=off) and the three take turns (a
new random order for every phase of every round): prefill --prefill tokens in one call
(untimed, then again timed), prefill on in chunks of --chunk to each context length, then
--steps greedy decode steps, each step timed with its MeKi row read from memory.zarr and the
argmax; in decoding the three take turns of one step each (a new random order every step), so
a slow stretch of a shared machine (this 2-core VM slows by 2x for seconds at a time) falls on
all three alike.
Prints tokens/s (all steps of a phase) and tokens per second of the worker's CPU time (user +
system: less sensitive to other load on the machine), the per-round ratios' medians, prefill
seconds, each worker's peak RSS and the file sizes; writes results.json to --work_dir.
"""

import argparse
import os
import json
import multiprocessing
import pathlib
import random
import resource
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # the builds run JAX on the CPU
PEER_PACKAGES = ('torch==2.13.0', 'executorch==1.5.1', 'optimum-executorch==1.1.0')
HF_VOCAB = 151_936  # Qwen3's Hugging Face configs; ours is 151,680 (spec section 1)
QWEN3_0P6B = dict(vocab_size=HF_VOCAB, hidden_size=1024, intermediate_size=3072,
                  num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                  head_dim=128, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True, max_position_embeddings=40_960)
MODELS = ('peer', 'dense', 'meki')
HUGE_PAGES = 'glibc.malloc.hugetlb=1'  # malloc madvises transparent huge pages


def run(command, **kwargs):
  print('$', ' '.join(map(str, command)), flush=True)
  subprocess.run(list(map(str, command)), check=True, **kwargs)


def build_hf_model(directory, seed=0):
  """A random Qwen3-0.6B saved with save_pretrained (safetensors + config.json)."""
  import torch
  import transformers
  torch.manual_seed(seed)
  model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**QWEN3_0P6B))
  model.save_pretrained(directory)


def build_peer(work, hf_dir, max_seq_len):
  """optimum-executorch's .pte of `hf_dir`, exported from its own virtual environment."""
  venv = work / 'peer-venv'
  if not (venv / 'bin' / 'optimum-cli').exists():
    run([sys.executable, '-m', 'venv', venv])
    run([venv / 'bin' / 'pip', 'install', '--quiet', '--disable-pip-version-check',
         *PEER_PACKAGES])
  run([venv / 'bin' / 'optimum-cli', 'export', 'executorch', '--model', hf_dir,
       '--task', 'text-generation', '--recipe', 'xnnpack', '--use_custom_sdpa',
       '--use_custom_kv_cache', '--qlinear', '8da4w', '--qembedding', '8w',
       '--max_seq_len', max_seq_len, '--output_dir', work / 'peer'])


def random_meki_params(config, backbone, seed=0):
  """MeKi-0.6B parameters: `backbone` (our layout, convert/hf_qwen3.py) and the MeKi branch at
  the recipe's init statistics (N(0, init_std) matrices and tables, unit gains and scalars)."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from meki_jax.convert import hf_qwen3
  from meki_jax.model.transformer import build_model
  shapes = nn.meta.unbox(jax.eval_shape(
      lambda: build_model(config.model).init(jax.random.PRNGKey(0),
                                             jnp.zeros((1, 1), jnp.int32))['params']))
  rng = np.random.default_rng(seed)

  def random_leaf(path, leaf):
    name = jax.tree_util.keystr(path)
    if 'meki' not in name:
      return np.broadcast_to(np.float32(0), leaf.shape)  # replaced by the backbone
    if leaf.ndim == 1 or name.endswith("['scale']"):
      return np.ones(leaf.shape, np.float32)  # alpha, beta (one per layer), RMSNorm gains
    return config.model.init_std * rng.standard_normal(leaf.shape, dtype=np.float32)
  return hf_qwen3.merge_backbone(jax.tree_util.tree_map_with_path(random_leaf, shapes),
                                 backbone)


def build_ours(work, hf_dir, name, cache_len, group_size):
  """Our memory export and device export of `hf_dir` (dense) or of MeKi on its backbone."""
  from configs import dense_0p6b, meki_0p6b
  from meki_jax.convert import hf_qwen3
  from meki_jax.export import exporter, to_device
  config = (dense_0p6b if name == 'dense' else meki_0p6b).get_config()
  config.model.update(dtype='float32', rope_theta=QWEN3_0P6B['rope_theta'])
  if not (work / name).exists():  # else kept from an earlier run (write_device_export checks it)
    backbone = hf_qwen3.load_hf_qwen3(hf_dir, config.model)
    params = backbone if name == 'dense' else random_meki_params(config, backbone)
    del backbone
    exporter.export_folded(params, config.model, work / name, dtype='int8',
                           vocabulary={'size': config.model.vocab_size, 'eod_id': 151_643})
    del params
  to_device.write_device_export(work / name, work / f'{name}-device', cache_len=cache_len,
                                formats=('pte',), qlinear='8da4w', group_size=group_size,
                                qembedding='8w', logits='last')


class PeerSession:
  """optimum-executorch's program: forward(input_ids [1, t], cache_position [t]) -> logits
  [1, t, vocab], its KV cache inside."""

  def __init__(self, pte):
    from executorch.extension.llm.custom_ops import custom_ops  # noqa: F401
    import executorch.kernels.quantized  # noqa: F401
    from executorch.runtime import Runtime
    import torch
    torch.set_num_threads(1)  # as device_runtime.pte_runners does for ours: the glue only
    self.torch = torch
    self.forward = Runtime.get().load_program(pte).load_method('forward')
    self.length = 0

  def prefill(self, token_ids):
    positions = self.torch.arange(self.length, self.length + token_ids.shape[1])
    logits = self.forward.execute([token_ids, positions])[0]
    self.length += token_ids.shape[1]
    return logits[:, -1]

  def decode(self, token):
    logits = self.forward.execute([token[:, None], self.torch.tensor([self.length])])[0]
    self.length += 1
    return logits[:, -1]


class OurSession:
  """Our device export through device_runtime (rows read from memory.zarr inside each call)."""

  def __init__(self, device_dir, memory_dir):
    from meki_jax.export import device_runtime, memory_store
    device, prefill, decode = device_runtime.device_runners(device_dir, memory_dir, 'pte')
    _, memory = memory_store.open_export(memory_dir)
    self.session = device_runtime.Session(memory, prefill, decode, device['cache_len'])

  @property
  def length(self):
    return self.session.length

  @length.setter
  def length(self, value):
    self.session.length = value

  def prefill(self, token_ids):
    return self.session.prefill(token_ids)[:, -1]

  def decode(self, token):
    return self.session.decode(token)


def worker(connection, name, work):
  """Loads one model, says so, then serves ('prefill', ids, chunk), ('decode', steps),
  ('reset',) and ('rss',)."""
  import torch
  session = (PeerSession(work / 'peer' / 'model.pte') if name == 'peer' else
             OurSession(work / f'{name}-device', work / name))
  connection.send('ready')
  next_token = None
  while True:
    command, *args = connection.recv()
    if command == 'reset':
      session.length = 0
      connection.send(None)
    elif command == 'prefill':
      token_ids, chunk = args
      starts = list(range(0, len(token_ids), chunk))
      if len(token_ids) - starts[-1] == 1 and len(starts) > 1:
        starts.pop()  # a one-token call is a decode step: the last chunk takes it
      begin = time.perf_counter()
      for start, stop in zip(starts, starts[1:] + [len(token_ids)]):
        logits = session.prefill(torch.tensor([token_ids[start:stop]]))
      next_token = logits.argmax(-1)
      connection.send(time.perf_counter() - begin)
    elif command == 'decode':
      seconds, cpu_begin = [], time.process_time()
      for _ in range(args[0]):
        begin = time.perf_counter()
        next_token = session.decode(next_token).argmax(-1)
        seconds.append(time.perf_counter() - begin)
      connection.send((seconds, time.process_time() - cpu_begin))
    elif command == 'rss':
      connection.send(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    else:
      connection.send(None)
      return


def start_workers(work, huge_pages):
  """One spawned worker process per model; with `huge_pages`, glibc's malloc asks the kernel
  for transparent huge pages (GLIBC_TUNABLES=glibc.malloc.hugetlb=1, read at process start)."""
  context = multiprocessing.get_context('spawn')
  workers, environment = {}, dict(os.environ)
  if huge_pages:
    os.environ['GLIBC_TUNABLES'] = HUGE_PAGES
  try:
    for name in MODELS:
      ours, theirs = context.Pipe()
      process = context.Process(target=worker, args=(theirs, name, work), daemon=True)
      process.start()
      theirs.close()  # the worker's end: its exit then ends `ours` with EOF
      workers[name] = (process, ours)
  finally:
    os.environ.clear()
    os.environ.update(environment)
  for name, (_, connection) in workers.items():  # all loaded before anything is timed
    try:
      connection.recv()
    except EOFError:
      raise SystemExit(f'the {name} worker ended while loading its program (its error is '
                       'printed above)') from None
  return workers


def stop_workers(workers):
  for process, connection in workers.values():
    connection.send(('stop',))
    process.join(timeout=60)


def ask(workers, name, *command):
  workers[name][1].send(command)
  return workers[name][1].recv()


def measure(work, args):
  """{(phase, model): [per-round value]}: prefill seconds, decode tokens/s, peak RSS bytes.

  Every round starts the workers afresh, so each model is measured in --rounds processes:
  where the allocator places a program's memory moves its decode speed from one process to the
  next (measured with dense-0.6B and MeKi-0.6B loaded in one process, after 1K tokens: without
  huge pages the one loaded second decoded 5% faster in one order and 12% in the other; with
  them, 1%). A round: the workers load their programs, each prefills --prefill tokens once
  untimed (a fresh process's first call pays one-time costs), then again in one call (timed)
  from an empty cache, then for each context length fills its cache with more of the prompt
  up to that length and decodes --steps tokens. The models decode in turns of one step (a new random
  order every step), so a slow stretch of a shared machine falls on all three alike; the other
  phases visit the models in a new random order each."""
  rng = random.Random(0)
  results = {}
  for round_index in range(args.rounds):
    workers = start_workers(work, args.huge_pages == 'on')
    try:
      measure_round(workers, args, round_index, rng, results)
      for name in MODELS:
        results.setdefault(('peak RSS', name), []).append(ask(workers, name, 'rss'))
    finally:
      stop_workers(workers)
  return results


def measure_round(workers, args, round_index, rng, results):
  """One round of `measure` on running workers, its values appended to `results`."""
  prompt = np.random.default_rng(round_index).integers(0, 151_669, max(args.contexts))
  prompt = prompt.tolist()
  used = filled = args.prefill  # prompt tokens fed, cache slots written (alike for all)
  for name in MODELS:  # a fresh process's first call pays one-time costs: not timed
    ask(workers, name, 'prefill', prompt[:args.prefill], args.prefill)
    ask(workers, name, 'reset')
  for name in rng.sample(MODELS, len(MODELS)):
    seconds = ask(workers, name, 'prefill', prompt[:args.prefill], args.prefill)
    results.setdefault((f'prefill {args.prefill}', name), []).append(seconds)
  for phase in args.contexts:
    for name in rng.sample(MODELS, len(MODELS)):
      ask(workers, name, 'prefill', prompt[used:used + phase - filled], args.chunk)
    used, filled = used + phase - filled, phase + args.steps
    step_seconds, cpu_seconds = {name: [] for name in MODELS}, dict.fromkeys(MODELS, 0.0)
    for _ in range(args.steps):
      for name in rng.sample(MODELS, len(MODELS)):
        (seconds,), cpu = ask(workers, name, 'decode', 1)
        step_seconds[name].append(seconds)
        cpu_seconds[name] += cpu
    for name in MODELS:
      steps = step_seconds[name]
      results.setdefault((f'decode after {phase}', name), []).append(len(steps) / sum(steps))
      results.setdefault((f'decode per CPU-s after {phase}', name), []).append(
          len(steps) / cpu_seconds[name])
      print(f'round {round_index + 1}, decode after {phase}, {name}: '
            f'{len(steps) / sum(steps):.2f} tokens/s (median step '
            f'{1e3 * np.median(steps):.1f} ms), {len(steps) / cpu_seconds[name]:.2f} tokens '
            'per CPU-second', flush=True)


def file_bytes(path):
  """The size of a file, or of every file under a directory."""
  path = pathlib.Path(path)
  files = path.rglob('*') if path.is_dir() else [path]
  return sum(file.stat().st_size for file in files if file.is_file())


def report(results, work, args):
  rss = {name: max(results.pop(('peak RSS', name))) for name in MODELS}
  rows = []
  for key in sorted({key for key, _ in results}, key=lambda key: (key.split()[0], key)):
    values = {name: results[(key, name)] for name in MODELS}
    medians = {name: float(np.median(values[name])) for name in MODELS}
    ratio = lambda a, b: float(np.median(np.array(values[a]) / np.array(values[b])))
    rows.append({'phase': key, **{name: medians[name] for name in MODELS},
                 'dense/peer': ratio('dense', 'peer'), 'meki/dense': ratio('meki', 'dense')})
  sizes = {'peer program': file_bytes(work / 'peer' / 'model.pte'),
           'dense program': file_bytes(work / 'dense-device' / 'model.pte'),
           'meki program': file_bytes(work / 'meki-device' / 'model.pte'),
           'meki tables (int8, memory.zarr)': file_bytes(work / 'meki' / 'memory.zarr')}
  unit = lambda phase: ('s' if phase.startswith('prefill') else
                        'tokens/CPU-s' if 'CPU' in phase else 'tokens/s')
  print(f'\n{"phase":<22}{"peer":>12}{"dense":>12}{"meki":>12}{"dense/peer":>12}'
        f'{"meki/dense":>12}   (medians of {args.rounds} rounds; ratios per round)')
  for row in rows:
    if row['phase'].startswith('prefill'):  # seconds: a ratio above 1 is slower
      row['dense/peer'], row['meki/dense'] = 1 / row['dense/peer'], 1 / row['meki/dense']
    print(f'{row["phase"]:<22}' + ''.join(f'{row[name]:>12.3f}' for name in MODELS) +
          f'{row["dense/peer"]:>12.3f}{row["meki/dense"]:>12.3f}   {unit(row["phase"])}')
  print('prefill ratios are speed ratios too (time of the baseline / time)')
  print('peak RSS GiB: ' + ', '.join(f'{name} {rss[name] / 2**30:.3f}' for name in MODELS) +
        f'; meki/dense {rss["meki"] / rss["dense"]:.3f}')
  print('bytes: ' + ', '.join(f'{name} {size:,}' for name, size in sizes.items()))
  (work / 'results.json').write_text(json.dumps(
      {'args': vars(args) | {'work_dir': str(work)}, 'rows': rows, 'rounds': {
          f'{key[0]} | {key[1]}': value for key, value in results.items()},
       'peak_rss_bytes': rss, 'bytes': sizes}, indent=1) + '\n')


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--work_dir', required=True, type=pathlib.Path)
  parser.add_argument('--contexts', default='1024,8192',
                      type=lambda text: [int(value) for value in text.split(',')])
  parser.add_argument('--steps', type=int, default=64)
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--prefill', type=int, default=512, help='tokens of the timed prefill')
  parser.add_argument('--chunk', type=int, default=1024, help='prefill tokens per call')
  parser.add_argument('--group_size', type=int, default=32, help='8da4w weights per scale')
  parser.add_argument('--huge_pages', choices=('on', 'off'), default='on',
                      help='workers run with GLIBC_TUNABLES=glibc.malloc.hugetlb=1')
  parser.add_argument('--build', choices=('hf', 'peer', 'dense', 'meki'),
                      help='build one artefact (the run does this in subprocesses)')
  args = parser.parse_args()
  work = args.work_dir.absolute()
  cache_len = max(args.contexts) + args.steps
  cache_len += -cache_len % 128
  hf_dir = work / 'qwen3-0.6b'
  if args.build == 'hf':
    return build_hf_model(hf_dir)
  if args.build == 'peer':
    return build_peer(work, hf_dir, cache_len)
  if args.build:
    return build_ours(work, hf_dir, args.build, cache_len, args.group_size)
  if sorted(args.contexts) != args.contexts or args.contexts[0] < args.prefill + 2:
    parser.error('--contexts must increase and exceed --prefill by 2 or more')
  work.mkdir(parents=True, exist_ok=True)
  for name, artefact in (('hf', hf_dir), ('peer', work / 'peer' / 'model.pte'),
                         ('dense', work / 'dense-device'), ('meki', work / 'meki-device')):
    if not artefact.exists():  # one at a time, each in its own process: memory returns
      run([sys.executable, __file__, f'--work_dir={work}', f'--build={name}',
           f'--contexts={",".join(map(str, args.contexts))}', f'--steps={args.steps}',
           f'--group_size={args.group_size}'])
  report(measure(work, args), work, args)


if __name__ == '__main__':
  main()
