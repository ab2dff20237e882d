"""The logit lens: per-layer hidden states are the model's, and KL(final || layer) behaves.

Tolerances: the lens runs the layers under nn.scan, the manual path one apply per layer, so
float32 results differ by reassociation only (measured: hidden states 7e-7 of values up to
5.3, KL 9e-7 of values ~0.02).
"""

import json
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from meki_jax.data.pipeline import make_eval_dataset
from meki_jax.eval import logit_lens, scoring
from meki_jax.fold import layer_slice
from meki_jax.model.layers import rms_norm
from meki_jax.model.transformer import DecoderLayer, build_model

REPO = pathlib.Path(__file__).resolve().parents[2]


def _packed_batch(vocab_size):
  """Two rows [2, 12]; the first packs two documents (positions restart, segment 2)."""
  token_ids = jax.random.randint(jax.random.PRNGKey(3), (2, 12), 0, vocab_size)
  positions = np.array([list(range(7)) + list(range(5)), list(range(12))], np.int32)
  segment_ids = np.array([[1] * 7 + [2] * 5, [1] * 12], np.int32)
  return token_ids, positions, segment_ids


def _manual_hidden(model_config, params, token_ids, positions, segment_ids):
  """The residual stream after each layer, one DecoderLayer.apply per layer: [L, b, s, d]."""
  embed_rows = params['embed']['embedding'][token_ids]
  x, hidden = embed_rows, []
  for layer in range(model_config.num_layers):
    x, _ = DecoderLayer(model_config).apply({'params': layer_slice(params['layers'], layer)},
                                            x, token_ids, embed_rows, positions, segment_ids)
    hidden.append(x)
  return jnp.stack(hidden)


def _manual_log_probs(model_config, params, x):
  """Final RMSNorm and the tied unembedding by hand: [..., d] -> log-probabilities [..., vocab]."""
  normed = rms_norm(x, params['final_norm']['scale'], model_config.norm_eps, jnp.float32)
  return jax.nn.log_softmax(normed @ params['embed']['embedding'].T)


def test_hidden_states_and_kl_equal_a_layer_by_layer_computation(eval_run):
  config, _, _, params = eval_run
  model_config = ml_collections.FrozenConfigDict(config.model)
  token_ids, positions, segment_ids = _packed_batch(model_config.vocab_size)
  hidden, kl = logit_lens.LogitLens(model_config).apply({'params': params}, token_ids,
                                                        positions, segment_ids)

  expected_hidden = _manual_hidden(model_config, params, token_ids, positions, segment_ids)
  np.testing.assert_allclose(hidden, expected_hidden, rtol=1e-5, atol=1e-6)
  log_probs = [_manual_log_probs(model_config, params, h) for h in expected_hidden]
  logits = build_model(model_config).apply({'params': params}, token_ids, positions, segment_ids)
  np.testing.assert_allclose(log_probs[-1], jax.nn.log_softmax(logits), rtol=0, atol=1e-5)
  expected_kl = [np.sum(np.exp(log_probs[-1]) * (log_probs[-1] - lp), axis=-1)
                 for lp in log_probs]
  np.testing.assert_allclose(kl, np.stack(expected_kl), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('baseline', ['ple', 'engram'])
def test_storage_baselines_are_refused(tiny_model_config, baseline):
  model_config = tiny_model_config()
  model_config[baseline].enabled = True
  token_ids = np.zeros((1, 4), np.int32)
  with pytest.raises(ValueError, match=f'model.{baseline}.enabled=True'):
    logit_lens.LogitLens(ml_collections.FrozenConfigDict(model_config)).init(
        jax.random.PRNGKey(0), token_ids, token_ids, token_ids)


@pytest.fixture(scope='module')
def report(eval_run):
  config, _, workdir, _ = eval_run
  eval_model = scoring.restore_eval_model(config, workdir)  # folded
  batches = make_eval_dataset(config.data, global_batch_size=8)
  return logit_lens.mean_layer_kl(eval_model, batches, num_batches=2)


def test_last_layer_kl_is_zero_and_earlier_ones_positive(report, eval_run):
  config, _, _, _ = eval_run
  assert report['direction'] == 'KL(final || layer)'
  assert len(report['kl']) == config.model.num_layers
  assert abs(report['kl'][-1]) <= 1e-6
  assert all(kl > 0 for kl in report['kl'][:-1])
  batches = list(make_eval_dataset(config.data, global_batch_size=8))[:2]
  assert report['batches'] == 2
  assert report['tokens'] == int(sum(batch['loss_mask'].sum() for batch in batches))


@pytest.mark.parametrize('where', ['local', 'gs'])
def test_report_is_written_as_json_and_png(report, tmp_path, request, where):
  out = (f'{request.getfixturevalue("gcs_bucket")}/run/lens' if where == 'gs'
         else tmp_path / 'lens')
  json_path, png_path = logit_lens.write_report(report, out)
  assert json.loads(json_path.read_text()) == report
  assert png_path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  table = logit_lens.format_table(report)
  assert 'KL(final || layer)' in table
  assert f'{len(report["kl"]):>5}  {report["kl"][-1]:>10.5f}' in table


@pytest.mark.slow
def test_command_line_prints_the_table_and_writes_the_files(eval_run, tmp_path):
  _, config_path, workdir, _ = eval_run
  result = subprocess.run(
      [sys.executable, str(REPO / 'tools' / 'logit_lens.py'), f'--config={config_path}',
       f'--workdir={workdir}', '--num_batches=1', f'--out={tmp_path}'],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'KL(final || layer)' in result.stdout
  assert (tmp_path / 'logit_lens.json').exists() and (tmp_path / 'logit_lens.png').exists()
