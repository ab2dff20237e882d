"""A gs:// workdir against the local Cloud Storage server: the lock as an object, checksums,
metrics, the run record, the URLs refused before step 1, and (slow) the quick start trained,
killed and resumed there (issue 23)."""

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from configs import quickstart
from meki_jax import files, run_config
from meki_jax.train import checkpoint, checksums, lock as lock_lib
from meki_jax.train.errors import RunError
from meki_jax.train.loop import train
from meki_jax.train.metrics import MetricWriter, drop_records_after, read_metrics
from tests.train.test_loop import small_config
from tests.train.test_reliability_units import REPO, _holder


def _lock_record(workdir):
  return json.loads((files.path(workdir) / lock_lib.FILENAME).read_text())


def test_a_second_trainer_on_a_gs_workdir_is_refused_and_a_killed_ones_lock_is_taken_over(
    gcs_bucket, capsys):
  workdir = f'{gcs_bucket}/run'
  holder = _holder(workdir)
  try:
    with pytest.raises(RunError, match=rf'{workdir}/trainer.lock names pid {holder.pid} on host '
                                       rf'{socket.gethostname()} .* which is still running'):
      lock_lib.workdir_lock(workdir).acquire()
  finally:
    holder.kill()  # SIGKILL: the object stays, naming a process that no longer runs
    holder.wait()
  assert _lock_record(workdir)['pid'] == holder.pid
  workdir_lock = lock_lib.workdir_lock(workdir)
  assert workdir_lock.acquire()['pid'] == holder.pid
  assert f'took over the stale lock of pid {holder.pid}' in capsys.readouterr().err
  assert _lock_record(workdir)['pid'] == os.getpid()
  workdir_lock.release()
  assert not (files.path(workdir) / lock_lib.FILENAME).exists()


def test_a_gs_lock_of_another_host_counts_while_its_heartbeat_is_fresh(gcs_bucket):
  lock_object = files.path(f'{gcs_bucket}/run') / lock_lib.FILENAME
  record = {'host': 'tpu-worker-0', 'pid': 4242, 'started': time.time() - 3600}
  lock_object.write_text(json.dumps({**record, 'heartbeat': time.time() - 20}))
  with pytest.raises(RunError, match=r'names pid 4242 on host tpu-worker-0 .* heartbeat 20 s'):
    lock_lib.workdir_lock(f'{gcs_bucket}/run').acquire()
  lock_object.write_text(json.dumps(
      {**record, 'heartbeat': time.time() - lock_lib.STALE_SECONDS - 10}))
  workdir_lock = lock_lib.workdir_lock(f'{gcs_bucket}/run')
  assert workdir_lock.acquire()['host'] == 'tpu-worker-0'
  workdir_lock.release()


def test_a_gs_lock_taken_over_stops_its_heartbeat_and_is_not_deleted_by_its_old_holder(
    gcs_bucket, monkeypatch, capsys):
  monkeypatch.setattr(lock_lib, 'HEARTBEAT_SECONDS', 0.05)
  workdir_lock = lock_lib.workdir_lock(f'{gcs_bucket}/run')
  workdir_lock.acquire()
  first = _lock_record(f'{gcs_bucket}/run')['heartbeat']
  deadline = time.time() + 30
  while _lock_record(f'{gcs_bucket}/run')['heartbeat'] == first:  # generation-checked rewrites
    assert time.time() < deadline, 'no heartbeat within 30 s'
    time.sleep(0.05)
  other = {'host': 'tpu-worker-1', 'pid': 7, 'started': 0, 'heartbeat': time.time()}
  (files.path(f'{gcs_bucket}/run') / lock_lib.FILENAME).write_text(json.dumps(other))
  while not workdir_lock.lost:
    assert time.time() < deadline, 'the takeover was not noticed within 30 s'
    time.sleep(0.05)
  workdir_lock.release()
  assert _lock_record(f'{gcs_bucket}/run') == other
  assert 'was taken over by another trainer' in capsys.readouterr().err


def test_a_flipped_byte_in_a_checkpoint_object_is_named(gcs_bucket):
  step = files.path(f'{gcs_bucket}/run/checkpoints/2')
  data = step / 'state' / 'ocdbt.process_0' / 'd' / 'abc123'
  data.write_bytes(bytes(range(256)) * 64)
  (step / 'state' / '_METADATA').write_text('{"tree": 1}')
  (step / checksums.COMMIT_OBJECT).write_text('committed')
  manifest = checksums.write_manifest(step)
  assert set(manifest['files']) == {'state/ocdbt.process_0/d/abc123', 'state/_METADATA'}
  assert checksums.verify(step) is None
  raw = bytearray(data.read_bytes())
  raw[5000] ^= 0x01
  data.write_bytes(bytes(raw))
  assert checksums.verify(step) == (f'{data} does not match its checksum (its bytes changed '
                                    'after the save)')
  (step.parent / '4' / 'state').mkdir(parents=True)
  (step.parent / '4' / 'state' / '_METADATA').write_text('{}')  # a save cut off: no commit object
  assert checksums.committed_steps(step.parent) == [2]


def test_metrics_and_the_run_record_in_a_gs_workdir(gcs_bucket):
  workdir = f'{gcs_bucket}/run'
  writer = MetricWriter(workdir)
  for step in (1, 2, 3):
    writer.write(step, {'loss': float(step)})
  writer.close()
  assert [r['step'] for r in read_metrics(workdir)] == [1, 2, 3]
  assert drop_records_after(workdir, 2) == 1
  writer = MetricWriter(workdir, start_step=2)
  writer.write(3, {'loss': 3.5})
  writer.close()
  assert [(r['step'], r['loss']) for r in read_metrics(workdir)] == [(1, 1.0), (2, 2.0), (3, 3.5)]
  events = files.files_under(f'{workdir}/tensorboard')  # named by the second each run began
  assert events and all(name.startswith('events.out.tfevents') for name in events)
  assert all(files.size(f'{workdir}/tensorboard/{name}') > 0 for name in events)

  config = small_config(2)
  run_config.write(workdir, run_config.record(config))
  assert run_config.load(workdir).model.to_dict() == config.model.to_dict()
  config.model.meki.d_mem = 16
  with pytest.raises(ValueError, match=rf'{workdir}/config.json was written for a different '
                                       'model.*model.meki.d_mem: 8 in the workdir, 16 now'):
    run_config.check(config, workdir)


@pytest.mark.parametrize('workdir, error, message', [
    ('s3://bucket/run', ValueError, 's3:// URLs are not supported'),
    ('gs://no-such-bucket-0/run', FileNotFoundError, 'bucket gs://no-such-bucket-0 does not exist'),
])
def test_a_workdir_url_that_cannot_be_served_is_refused_before_step_1(
    gcs_emulator, workdir, error, message):
  with pytest.raises(error, match=message):
    train(small_config(1), workdir)


_KILLED_RUN = '''
from tests.train.test_gcs_workdir import quickstart_steps
def get_config():
  return quickstart_steps(100_000)
'''


def quickstart_steps(num_steps):
  """The quick-start config, stopped after `num_steps` of the learning-rate schedule of 4 steps,
  a checkpoint every 2, every step logged."""
  config = quickstart.get_config()
  config.train.update(num_steps=num_steps, log_every=1, eval_every=100_000, checkpoint_every=2)
  config.optim.schedule_steps = 4
  return config


def _losses(workdir):
  return {record['step']: record['loss'] for record in read_metrics(workdir) if 'loss' in record}


def _largest_object(directory):
  return max((files.path(directory) / name for name in files.files_under(directory)),
             key=files.size)


@pytest.mark.slow
def test_the_quickstart_trains_into_gs_resumes_after_sigkill_bit_for_bit_and_sets_damage_aside(
    gcs_bucket, tmp_path, capsys):
  train(quickstart_steps(4), str(tmp_path / 'whole'))  # the reference, on local disk
  whole = _losses(tmp_path / 'whole')

  workdir = f'{gcs_bucket}/quickstart'
  (tmp_path / 'killed.py').write_text(_KILLED_RUN)
  process = subprocess.Popen(
      [sys.executable, '-m', 'meki_jax.train', f'--config={tmp_path / "killed.py"}',
       f'--workdir={workdir}'], cwd=REPO, env=dict(os.environ, JAX_PLATFORMS='cpu',
                                                   PYTHONPATH=REPO),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while 2 not in checksums.committed_steps(f'{workdir}/checkpoints') or len(_losses(workdir)) < 3:
    assert process.poll() is None, process.stdout.read()
    assert time.time() < deadline, 'no committed step 2 and 3 logged steps within 600 s'
    time.sleep(0.5)
  process.kill()  # SIGKILL: the lock object stays, a save in flight stays uncommitted
  process.communicate(timeout=60)

  capsys.readouterr()
  train(quickstart_steps(4), workdir)
  assert f'took over the stale lock of pid {process.pid}' in capsys.readouterr().err
  resumed = _losses(workdir)
  assert sorted(resumed) == [1, 2, 3, 4]  # each step logged once
  assert [resumed[step] for step in (3, 4)] == [whole[step] for step in (3, 4)]  # bit for bit

  damaged_object = _largest_object(f'{workdir}/checkpoints/4/state')
  raw = bytearray(damaged_object.read_bytes())
  raw[len(raw) // 2] ^= 0x10
  damaged_object.write_bytes(bytes(raw))
  train(quickstart_steps(4), workdir)
  aside = f'{workdir}/{checkpoint.DAMAGED}/4'
  assert (f'checkpoint step 4 is damaged ({damaged_object} does not match its checksum (its '
          f'bytes changed after the save)); moved to {aside} and skipped: resuming from step 2'
          in capsys.readouterr().err)
  assert checksums.verify(aside) is not None  # kept as it was, for inspection
  assert checkpoint.saved_steps(f'{workdir}/checkpoints') == [2, 4]
  assert checkpoint.verify_step(f'{workdir}/checkpoints', 4) is None  # saved again
  assert _losses(workdir) == resumed
