"""Checksum manifests, the workdir lock, metrics truncation, file modes, one-line CLI errors."""

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time

import pytest

from configs import quickstart
from meki_jax import files, run_config
from meki_jax.train import checksums, lock as lock_lib
from meki_jax.train.errors import RunError
from meki_jax.train.metrics import drop_records_after, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _step_like(directory):
  """A directory shaped like a checkpoint step: a large data file and small metadata."""
  data = directory / 'state' / 'ocdbt.process_0' / 'd'
  data.mkdir(parents=True)
  (data / 'abc123').write_bytes(os.urandom(1 << 20))
  (directory / 'state' / '_METADATA').write_text('{"tree": 1}')
  (directory / '_CHECKPOINT_METADATA').write_text('{"time": 1}')
  return data / 'abc123'


@pytest.mark.parametrize('offset', [0, 1, 4096, 333_333, 700_001, (1 << 20) - 1])
def test_a_flipped_byte_is_found_and_named(tmp_path, offset):
  data_file = _step_like(tmp_path)
  manifest = checksums.write_manifest(str(tmp_path))
  assert set(manifest['files']) == {'state/ocdbt.process_0/d/abc123', 'state/_METADATA'}
  assert checksums.verify(str(tmp_path)) is None
  raw = bytearray(data_file.read_bytes())
  raw[offset] ^= 0x01
  data_file.write_bytes(bytes(raw))
  problem = checksums.verify(str(tmp_path))
  assert problem == f'{data_file} does not match its checksum (its bytes changed after the save)'


def test_truncated_missing_and_unlisted_files(tmp_path):
  data_file = _step_like(tmp_path)
  checksums.write_manifest(str(tmp_path))
  (tmp_path / 'extra').write_text('not in the manifest: ignored')
  (tmp_path / '_CHECKPOINT_METADATA').write_text('{"time": 2, "rewritten": "at commit"}')
  assert checksums.verify(str(tmp_path)) is None
  data_file.write_bytes(data_file.read_bytes()[:1000])
  assert 'has 1000 bytes, the manifest says 1048576' in checksums.verify(str(tmp_path))
  data_file.unlink()
  assert 'abc123 is unreadable' in checksums.verify(str(tmp_path))
  (tmp_path / checksums.MANIFEST).unlink()
  assert 'checksums.json does not exist' in checksums.verify(str(tmp_path))
  (tmp_path / checksums.MANIFEST).write_text('{"algorithm": "md5"')
  assert 'checksums.json is unreadable' in checksums.verify(str(tmp_path))


def test_processes_share_the_files_to_verify(tmp_path):
  for name in 'abcdef':
    (tmp_path / name).write_text(name * 100)
  checksums.write_manifest(str(tmp_path))
  (tmp_path / 'd').write_text('x' * 100)  # 4th of 6 sorted files: part 1 of 2 reads it
  assert checksums.verify(str(tmp_path), part=0, parts=2) is None
  assert checksums.verify(str(tmp_path), part=1, parts=2).startswith(f'{tmp_path / "d"} does')


_HOLD = ('import sys, time\nfrom meki_jax.train.lock import WorkdirLock\n'
         'WorkdirLock(sys.argv[1]).acquire()\nprint("held", flush=True)\ntime.sleep(600)\n')


def _holder(workdir):
  process = subprocess.Popen([sys.executable, '-c', _HOLD, str(workdir)], cwd=REPO,
                             env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                             text=True)
  assert process.stdout.readline().strip() == 'held'
  return process


def test_a_second_trainer_is_refused_naming_the_holder(tmp_path):
  holder = _holder(tmp_path)
  try:
    with pytest.raises(RunError, match=rf'held by pid {holder.pid} on host '
                                       rf'{socket.gethostname()} \(since '):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    holder.kill()
    holder.wait()


def test_the_lock_of_a_killed_trainer_does_not_block_the_resume(tmp_path, capsys):
  holder = _holder(tmp_path)
  holder.send_signal(signal.SIGKILL)
  holder.wait()
  workdir_lock = lock_lib.WorkdirLock(str(tmp_path))
  stale = workdir_lock.acquire()
  assert stale['pid'] == holder.pid
  assert f'took over the stale lock of pid {holder.pid}' in capsys.readouterr().err
  assert json.loads((tmp_path / 'trainer.lock').read_text())['pid'] == os.getpid()
  workdir_lock.release()
  assert not (tmp_path / 'trainer.lock').exists()


def test_a_lock_recorded_by_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
  record = {'host': 'tpu-worker-0', 'pid': 4242, 'started': time.time() - 3600}
  (tmp_path / 'trainer.lock').write_text(json.dumps({**record, 'heartbeat': time.time() - 20}))
  with pytest.raises(RunError, match=r'names pid 4242 on host tpu-worker-0 .* heartbeat 20 s'):
    lock_lib.WorkdirLock(str(tmp_path)).acquire()
  stale_age = lock_lib.STALE_SECONDS + 10
  (tmp_path / 'trainer.lock').write_text(
      json.dumps({**record, 'heartbeat': time.time() - stale_age}))
  workdir_lock = lock_lib.WorkdirLock(str(tmp_path))
  assert workdir_lock.acquire()['host'] == 'tpu-worker-0'
  workdir_lock.release()


def test_a_full_disk_at_start_names_the_file_and_leaves_no_lock(tmp_path):
  """The lock is the first file the trainer writes (issue 21: '[Errno 28] No space left on
  device' named no file). A file-size limit of 0 fails every write as a full disk does."""
  soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
  resource.setrlimit(resource.RLIMIT_FSIZE, (0, hard))  # Python ignores SIGXFSZ: writes fail
  try:
    with pytest.raises(OSError, match=f"File too large: '{tmp_path / 'trainer.lock'}'"):
      lock_lib.WorkdirLock(str(tmp_path)).acquire()
  finally:
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
  assert not (tmp_path / 'trainer.lock').exists()


def test_metrics_past_the_restored_step_are_dropped(tmp_path):
  lines = [json.dumps({'step': step, 'loss': float(step)}) for step in (1, 2, 3, 4, 5)]
  (tmp_path / 'metrics.jsonl').write_text('\n'.join(lines) + '\n{"step": 6, "lo')  # cut by a kill
  assert drop_records_after(str(tmp_path), 3) == 3
  assert [r['step'] for r in read_metrics(tmp_path)] == [1, 2, 3]
  assert drop_records_after(str(tmp_path), 3) == 0


@pytest.mark.parametrize('umask', [0o022, 0o077, 0o002])
def test_written_files_honour_the_umask(tmp_path, umask):
  previous = os.umask(umask)
  try:
    run_config.write(str(tmp_path), run_config.record(quickstart.get_config()))
    files.write_atomically(str(tmp_path / 'other.json'), '{}')
  finally:
    os.umask(previous)
  for name in ('config.json', 'other.json'):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~umask, name
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []


def _run(args, extra_path=''):
  env = dict(os.environ, JAX_PLATFORMS='cpu',
             PYTHONPATH=os.pathsep.join(filter(None, [extra_path, REPO])))
  env.pop('MEKI_TRACEBACK', None)
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300)


@pytest.mark.parametrize('args, message', [
    (['-m', 'meki_jax.train', '--config=configs/no_such.py', '--workdir=W'],
     'python -m meki_jax.train: error: --config=configs/no_such.py: no such file'),
    (['-m', 'meki_jax.train', '--config=configs/quickstart.py', '--config.train.num_step=5',
      '--workdir=W'],
     'python -m meki_jax.train: error: --config.train.num_step=5: the config has no such field '
     'or cannot take this value: \'num_step\' Did you mean "num_steps" instead of "num_step"?'),
    (['-m', 'meki_jax.train', '--config=configs/quickstart.py', '--workdir=W',
      "--config.data.train_sources=[dict(path='x/*.array_record', weight=1.0)]"],
     'python -m meki_jax.train: error: data.train_sources[0]="[dict(path=\'x/*.array_record\', '
     'weight=1.0)]" must be a dict with a string "path", e.g. --config.data.train_sources=\'({'
     '"path": "shards/*.array_record", "weight": 1.0},)\' (MEKI_TRACEBACK=1 shows the traceback)'),
    (['-m', 'meki_jax.generate', '--workdir=/no/such/run', '--prompt=x'],
     'python -m meki_jax.generate: error: --workdir=/no/such/run does not exist '
     '(MEKI_TRACEBACK=1 shows the traceback)'),
])
def test_command_line_mistakes_are_one_line(tmp_path, args, message):
  result = _run([arg.replace('--workdir=W', f'--workdir={tmp_path / "run"}') for arg in args])
  assert result.returncode in (1, 2)
  assert result.stderr.strip().splitlines()[-1] == message
  assert 'Traceback' not in result.stderr
  assert not (tmp_path / 'run' / 'config.json').exists()


@pytest.mark.parametrize('args, extra', [
    (['tools/export_torch.py', '--memory=m', '--out=o'], 'device'),
    (['tools/run_device.py', '--memory=m', '--device=d', '--token_ids=1'], 'device'),
    (['-m', 'meki_jax.eval', '--tasks', 'piqa'], 'eval'),
])
def test_a_missing_extra_is_named(tmp_path, args, extra):
  module = 'torch' if extra == 'device' else 'lm_eval'
  (tmp_path / module).mkdir()  # shadows the installed package the way a missing one fails
  (tmp_path / module / '__init__.py').write_text(
      f'raise ModuleNotFoundError("No module named {module!r}", name={module!r})\n')
  result = _run(args, extra_path=str(tmp_path))
  assert result.returncode == 1, result.stderr
  assert result.stderr.strip().endswith(
      f'this needs the {module} package, which the [{extra}] extra installs: pip install '
      f'"meki-jax[{extra}]" (or pip install -e ".[{extra}]" in a clone)'), result.stderr
  assert 'Traceback' not in result.stderr


def test_an_empty_corpus_is_named_before_training(tmp_path):
  from configs import base
  from meki_jax.data import preprocess
  from meki_jax.data.pipeline import make_train_dataset
  (tmp_path / 'empty.jsonl').write_text('')
  preprocess.preprocess([str(tmp_path / 'empty.jsonl')], str(tmp_path / 'shards'),
                        progress=False)
  config = base.get_config()
  config.data.train_sources = (dict(path=str(tmp_path / 'shards' / '*.array_record')),)
  with pytest.raises(ValueError, match=r'data.train_sources\[0\] \(.*\) holds no documents '
                                       r'\(an empty corpus\?\)'):
    make_train_dataset(config.data, global_batch_size=8)
