"""One error path and Ctrl-C for every entry point (meki_jax/cli.py, meki_jax/interrupt.py).

The fast tests run the library functions in this process; the slow ones run every command line
of the issue's list (issue 21) in a subprocess, as a user would."""

import os
import signal
import subprocess
import sys
import time

import pytest

from meki_jax import cli, interrupt


def test_a_known_error_is_one_line_and_status_1(capsys, monkeypatch):
  monkeypatch.delenv('MEKI_TRACEBACK', raising=False)

  def fails():
    raise FileExistsError('/out exists;\n  pass --overwrite to replace it')

  with pytest.raises(SystemExit) as exit_info:
    cli.report(fails)
  assert exit_info.value.code == 1
  assert capsys.readouterr().err.splitlines()[-1].endswith(
      ': error: /out exists; pass --overwrite to replace it (MEKI_TRACEBACK=1 shows the '
      'traceback)')
  monkeypatch.setenv('MEKI_TRACEBACK', '1')
  with pytest.raises(FileExistsError):
    cli.report(fails)
  monkeypatch.delenv('MEKI_TRACEBACK')
  with pytest.raises(ZeroDivisionError):  # not a known error: a bug keeps its traceback
    cli.report(lambda: 1 / 0)


def test_a_usage_error_is_one_line_and_status_2(capsys):
  parser = cli.ArgumentParser()
  parser.add_argument('--out', required=True)
  with pytest.raises(SystemExit) as exit_info:
    parser.parse_args([])
  assert exit_info.value.code == 2
  assert capsys.readouterr().err.strip().endswith(
      ': error: the following arguments are required: --out')


def test_a_deferred_signal_only_requests_a_stop(capfd):
  """SIGTERM and a first Ctrl-C inside the trainer's loop (a second one exits the program:
  the slow test below sends it to a subprocess)."""
  before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
  for signum in (signal.SIGTERM, signal.SIGINT):
    deferred = interrupt.Deferred('first: saving', 'second: exiting')
    try:
      assert not deferred.requested
      os.kill(os.getpid(), signum)
      assert deferred.requested
    finally:
      deferred.close()
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
  assert capfd.readouterr().err.strip() == 'first: saving'


# ---- Every command line of the list, in a subprocess (slow) ----

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def artifacts(tmp_path_factory):
  """Paths of a trained workdir (steps 1, 2), a memory export of it, damaged copies of both, a
  truncated .jsonl.gz, config files that fail, and a directory of a user's notes."""
  import gzip
  import json
  import shutil

  from meki_jax.export import exporter, memory_store
  from meki_jax.train.loop import train
  from tests.train.test_loop import small_config
  root = tmp_path_factory.mktemp('cli')
  config = small_config(2, checkpoint_every=1)
  train(config, str(root / 'run'))
  exporter.export_checkpoint(root / 'run', config.model, root / 'export',
                             vocabulary=exporter.vocabulary_record(config.data,
                                                                   config.model.vocab_size))
  shutil.copytree(root / 'run', root / 'damaged_run')
  _flip(_largest_file(root / 'damaged_run' / 'checkpoints' / '2' / 'state'))
  for name, target in (('flipped_shard', memory_store.shard_file(3)),
                       ('flipped_backbone', memory_store.BACKBONE)):
    shutil.copytree(root / 'export', root / name)
    _flip(root / name / target)
  text = ''.join(json.dumps({'text': f'document {i} ' * 20}) + '\n' for i in range(2000))
  data = gzip.compress(text.encode())
  (root / 'truncated.jsonl.gz').write_bytes(data[:len(data) // 2])
  (root / 'whole.jsonl.gz').write_bytes(data)
  (root / 'syntax.py').write_text('def get_config(:\n')
  (root / 'raises.py').write_text('def get_config(arg=None):\n  raise ValueError("no such size")\n')
  (root / 'notes').mkdir()
  (root / 'notes' / 'todo.txt').write_text('keep me')
  (root / 'user.npy').write_text('my own file')
  return root


def _largest_file(directory):
  paths = [os.path.join(top, name) for top, _, names in os.walk(directory) for name in names]
  return max(paths, key=os.path.getsize)


def _flip(path, offset=100):
  with open(path, 'r+b') as stream:
    stream.seek(offset)
    byte = stream.read(1)[0]
    stream.seek(offset)
    stream.write(bytes([byte ^ 0x10]))


def _command(args, root):
  return [sys.executable, *[arg.format(root=root) for arg in args]]


def _environment(**settings):
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO)
  env.pop('MEKI_TRACEBACK', None)
  return {**env, **settings}


def _program(args):
  """How the one line names the program of a command line."""
  return f'python -m {args[1]}' if args[0] == '-m' else os.path.basename(args[0])


def _run(args, root, **settings):
  return subprocess.run(_command(args, root), cwd=REPO, env=_environment(**settings),
                        capture_output=True, text=True, timeout=600)


TRAIN = ['-m', 'meki_jax.train', '--workdir={root}/new_run']
GENERATE = ['-m', 'meki_jax.generate', '--workdir={root}/run', '--max_new_tokens=2']
EXPORT_MEMORY = ['tools/export_memory.py', '--checkpoint={root}/run']
EXPORT_TORCH = ['tools/export_torch.py', '--out={root}/device', '--formats=pt2']
PREPROCESS = ['tools/preprocess.py', '--input={root}/truncated.jsonl.gz', '--output={root}/shards']
ROWS = {  # issue row -> (arguments, status, the last line of stderr after '<program>: error: ')
    '5: a config file with a syntax error': (
        TRAIN + ['--config={root}/syntax.py'], 2,
        '--config={root}/syntax.py: the config file failed: SyntaxError: invalid syntax (line 1)'),
    '5: a config file whose get_config raises': (
        TRAIN + ['--config={root}/raises.py'], 2,
        '--config={root}/raises.py: the config file failed: ValueError: no such size'),
    '5: count_params with a failing config': (
        ['tools/count_params.py', '--config={root}/raises.py'], 2,
        '--config={root}/raises.py: the config file failed: ValueError: no such size'),
    '5: aot_compile with a config that is not Python': (
        ['tools/aot_compile.py', '--config={root}/syntax.py'], 2,
        '--config={root}/syntax.py: the config file failed: SyntaxError: invalid syntax (line 1)'),
    '5: a truncated .jsonl.gz': (
        PREPROCESS + ['--num_workers=1'], 1, '{root}/truncated.jsonl.gz: unreadable after line '),
    '5: a truncated .jsonl.gz, 2 workers': (
        PREPROCESS + ['--input={root}/whole.jsonl.gz', '--num_workers=2'], 1,
        '{root}/truncated.jsonl.gz: unreadable after line '),
    '5: export_memory onto an existing --out': (
        EXPORT_MEMORY + ['--out={root}/export'], 1,
        '{root}/export exists; pass --overwrite to replace it'),
    '5: export_memory from a missing checkpoint': (
        ['tools/export_memory.py', '--checkpoint={root}/missing', '--out={root}/out'], 1,
        '{root}/missing is neither a checkpoint step directory (<workdir>/checkpoints/<step>) '
        'nor a workdir with checkpoints'),
    '5: export_memory from a damaged step': (
        ['tools/export_memory.py', '--checkpoint={root}/damaged_run/checkpoints/2',
         '--out={root}/out'], 1,
        'checkpoint {root}/damaged_run/checkpoints/2 does not verify against its checksum '
        'manifest: '),
    '5: export_torch from a flipped shard': (
        EXPORT_TORCH + ['--memory={root}/flipped_shard'], 1,
        'memory shard 3 memory.zarr/c/3/0/0 has sha256 '),
    '5: export_torch from a flipped backbone': (
        EXPORT_TORCH + ['--memory={root}/flipped_backbone'], 1,
        'backbone backbone.safetensors has sha256 '),
    "5: run_device's export loading": (
        ['tools/run_device.py', '--memory={root}/export', '--device={root}/missing',
         '--token_ids=1'], 1,
        '{root}/missing/device.json does not exist: not a device export (tools/export_torch.py '
        'writes it)'),
    '5: generate with an empty prompt': (
        GENERATE + ['--prompt='], 1, 'prompt 0 is empty: decoding needs at least one token'),
    '5: generate with a prompt longer than --cache_len': (
        GENERATE + ['--prompt=def parse_args(', '--cache_len=3'], 1,
        'prompt 0 has 4 tokens: with max_new_tokens=2 it needs 6 cache slots, but cache_len=3'),
    '5: generate with a negative --max_new_tokens': (
        GENERATE[:-1] + ['--prompt=x', '--max_new_tokens=-1'], 1,
        'max_new_tokens=-1 must be >= 1'),
    '5: generate with a negative --temperature': (
        GENERATE + ['--prompt=x', '--temperature=-1'], 1,
        'sampling.temperature=-1.0 must be >= 0 (0 = greedy)'),
    '5: generate with --top_p=2': (
        GENERATE + ['--prompt=x', '--top_p=2'], 1, 'sampling.top_p=2.0 must be in (0, 1] (1 = off)'),
    '5: generate onto an existing --host_memory': (
        GENERATE + ['--prompt=x', '--host_memory={root}/user.npy'], 1,
        '{root}/user.npy exists; pass --overwrite to replace it'),
    '5: python -m meki_jax.eval with a missing workdir': (
        ['-m', 'meki_jax.eval', '--model', 'meki_jax', '--tasks', 'piqa', '--model_args',
         'workdir={root}/missing'], 1,
        '{root}/missing is neither a checkpoint step directory (<workdir>/checkpoints/<step>) '
        'nor a workdir with checkpoints'),
    '1: export_memory --out=<its workdir> --overwrite': (
        EXPORT_MEMORY + ['--out={root}/run', '--overwrite'], 1,
        '{root}/run is an input of this command: write the memory export somewhere else'),
    '1: export_torch --out=<its memory export> --overwrite': (
        EXPORT_TORCH[:-2] + ['--memory={root}/export', '--out={root}/export', '--overwrite'], 1,
        '{root}/export is an input of this command: write the device export somewhere else'),
    "1: export_memory --out=<a user's directory> --overwrite": (
        EXPORT_MEMORY + ['--out={root}/notes', '--overwrite'], 1,
        '{root}/notes exists and is not a memory export (it has no manifest.json with "format": '
        '"meki-export"): --overwrite replaces only a memory export; move it away or choose '
        'another path'),
    "1: generate --host_memory=<a user's file> --overwrite": (
        GENERATE + ['--prompt=x', '--host_memory={root}/user.npy', '--overwrite'], 1,
        "{root}/user.npy exists and is not a host-memory table (it does not begin with "
        "b'\\x93NUMPY'): --overwrite replaces only a host-memory table; move it away or choose "
        'another path'),
}


@pytest.mark.slow
@pytest.mark.parametrize('row', list(ROWS))
def test_every_entry_point_reports_a_known_error_as_one_line(artifacts, row):
  from meki_jax.export import memory_store
  from meki_jax.train import checksums
  args, status, message = ROWS[row]
  before = {path: os.path.getmtime(path) for path in _sources(artifacts)}
  result = _run(args, artifacts)
  lines = result.stderr.strip().splitlines()
  assert result.returncode == status, result.stderr[-3000:]
  assert 'Traceback' not in result.stderr, result.stderr[-3000:]
  program, error = lines[-1].split(': error: ', 1)
  assert program == _program(args), lines[-1]
  assert error.startswith(message.format(root=artifacts)), lines[-1]
  assert error.endswith(' (MEKI_TRACEBACK=1 shows the traceback)' if status == 1 else ''), error
  # nothing was lost: the sources verify and the user's files are there, unchanged
  assert {path: os.path.getmtime(path) for path in _sources(artifacts)} == before
  for step in (1, 2):
    assert checksums.verify(str(artifacts / 'run' / 'checkpoints' / str(step))) is None
  memory_store.open_export(artifacts / 'export')
  assert (artifacts / 'notes' / 'todo.txt').read_text() == 'keep me'
  assert (artifacts / 'user.npy').read_text() == 'my own file'


def _sources(root):
  return [os.path.join(top, name) for directory in ('run', 'export', 'notes')
          for top, _, names in os.walk(root / directory) for name in names]


@pytest.mark.slow
def test_meki_traceback_shows_the_traceback(artifacts):
  result = _run(EXPORT_MEMORY + ['--out={root}/export'], artifacts, MEKI_TRACEBACK='1')
  assert result.returncode == 1 and 'Traceback (most recent call last)' in result.stderr
  assert result.stderr.strip().endswith('exists; pass --overwrite to replace it')


@pytest.mark.slow
def test_export_memory_skips_a_damaged_newest_step_as_the_trainer_does(artifacts):
  """Issue row 8: one rule for every reader of a workdir."""
  import json
  result = _run(['tools/export_memory.py', '--checkpoint={root}/damaged_run',
                 '--out={root}/from_damaged'], artifacts)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'checkpoint step 2 is damaged and skipped: ' in result.stderr
  manifest = json.loads((artifacts / 'from_damaged' / 'manifest.json').read_text())
  assert manifest['source']['step'] == 1


# ---- Ctrl-C (issue row 2), in a subprocess (slow) ----

def _start(args, root):
  return subprocess.Popen(_command(args, root), cwd=REPO, env=_environment(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _read_until(process, marker, seconds=300):
  """The process' output up to `marker` (a progress bar writes no newline: read raw bytes)."""
  seen, deadline = b'', time.time() + seconds
  while marker.encode() not in seen:
    assert time.time() < deadline, f'no {marker!r} within {seconds} s: {seen[-2000:]!r}'
    chunk = os.read(process.stdout.fileno(), 4096)
    assert chunk, f'the process ended before {marker!r}: {seen[-2000:]!r}'
    seen += chunk
  return seen.decode(errors='replace')


def _wait_for_jax(process, seconds=300):
  """Until the process has loaded jaxlib: its start-up imports are under way."""
  deadline = time.time() + seconds
  while True:
    assert process.poll() is None and time.time() < deadline
    with open(f'/proc/{process.pid}/maps', encoding='utf-8') as maps:
      if 'jaxlib' in maps.read():
        return
    time.sleep(0.05)


def _interrupted(process, seen=''):
  """Sends Ctrl-C; returns (status, the output's non-empty lines, seconds until the exit)."""
  sent = time.time()
  process.send_signal(signal.SIGINT)
  output, _ = process.communicate(timeout=120)
  lines = [line for line in (seen + output.decode(errors='replace')).splitlines()
           if line.strip()]
  return process.returncode, lines, time.time() - sent


def _one_line(status, lines, seconds, program):
  assert status == 130, lines
  assert lines[-1] == f'{program}: interrupted (Ctrl-C)', lines
  assert not any('Traceback' in line or 'Fatal' in line for line in lines), lines
  assert seconds < 20, seconds  # at once: ~0.05 s on an idle machine


@pytest.mark.slow
def test_ctrl_c_during_an_export_keeps_the_old_export_and_leaves_nothing_partial(artifacts):
  import json
  import shutil

  from meki_jax import files
  from meki_jax.export import memory_store
  shutil.copytree(artifacts / 'export', artifacts / 'kept')
  before = (artifacts / 'kept' / 'manifest.json').read_text()
  process = _start(EXPORT_MEMORY + ['--out={root}/kept', '--overwrite', '--rows_per_shard=1024'],
                   artifacts)
  seen = _read_until(process, 'fold M~')  # the backbone is written, the fold under way
  _one_line(*_interrupted(process, seen), 'export_memory.py')
  assert (artifacts / 'kept' / 'manifest.json').read_text() == before
  memory_store.open_export(artifacts / 'kept')
  assert not files.temporary_path(artifacts / 'kept').exists()
  assert json.loads(before)['memory']['rows_per_shard'] != 1024


@pytest.mark.slow
def test_ctrl_c_while_generate_and_preprocess_start_is_one_line(artifacts):
  import psutil
  process = _start(GENERATE + ['--prompt=x'], artifacts)
  _wait_for_jax(process)
  _one_line(*_interrupted(process), 'python -m meki_jax.generate')

  inputs = [f'--input={artifacts}/whole.jsonl.gz'] + [
      f'--input={artifacts}/copy{index}.jsonl.gz' for index in range(8)]
  for index in range(8):
    (artifacts / f'copy{index}.jsonl.gz').write_bytes(
        (artifacts / 'whole.jsonl.gz').read_bytes())
  process = _start(['tools/preprocess.py', *inputs, '--output={root}/many_shards',
                    '--num_workers=2'], artifacts)
  seen = _read_until(process, 'preprocess:')  # the workers are converting
  workers = psutil.Process(process.pid).children(recursive=True)
  _one_line(*_interrupted(process, seen), 'preprocess.py')
  assert workers and not [worker for worker in psutil.wait_procs(workers, timeout=30)[1]]
  assert not (artifacts / 'many_shards').exists()
  assert not (artifacts / '.many_shards.partial').exists()
