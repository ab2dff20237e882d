"""The lm-eval adapter: its numbers are the model's, computed here by direct forward passes.

Tolerance: summed log-probabilities agree to 1e-5. The adapter batches rows over 8 devices at
bucket lengths and takes logsumexp, the direct pass is one row through log_softmax, so only the
float32 rounding differs (measured: <= 3e-6 on sums of -12 to -228).
"""

import json
import os

# lm-eval loads task data through Hugging Face `datasets`; the toy task is a local file, and
# these must be set before `datasets` is imported to keep it from reaching the network.
os.environ['HF_DATASETS_OFFLINE'] = '1'
os.environ['HF_HUB_OFFLINE'] = '1'

import pathlib  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from meki_jax.data.tokenizer import load_tokenizer  # noqa: E402
from meki_jax.eval import scoring  # noqa: E402
from meki_jax.eval.lm_eval_adapter import MekiLM  # noqa: E402
from meki_jax.fold import fold_params  # noqa: E402
from meki_jax.model.transformer import build_model  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
TASK_DIR = REPO / 'tests' / 'eval' / 'data'
TOL = 1e-5
DIRECT_LEN = 80  # longer than any row the tests score directly


@pytest.fixture(scope='module')
def lm(eval_run):
  _, _, workdir, _ = eval_run  # the config comes from <workdir>/config.json
  return MekiLM.create_from_arg_string(f'workdir={workdir}', {'batch_size': 4, 'device': 'cpu'})


@pytest.fixture(scope='module')
def direct(eval_run):
  """token ids -> log_softmax of the folded model's logits [len, vocab], one row.

  The row is right-padded to DIRECT_LEN so that all tests compile one program; attention is
  causal, so the padding changes no logit of the row's own tokens.
  """
  config, _, _, params = eval_run
  model, folded = build_model(config.model, folded=True), fold_params(params, config.model)
  forward = jax.jit(lambda params, ids: jax.nn.log_softmax(model.apply({'params': params}, ids)))

  def logprobs(token_ids):
    row = np.zeros((1, DIRECT_LEN), np.int32)
    row[0, :len(token_ids)] = token_ids
    return np.asarray(forward(folded, row))[0, :len(token_ids)]
  return logprobs


def _requests(kind, args_list):
  return [Instance(request_type=kind, doc={}, arguments=args, idx=i)
          for i, args in enumerate(args_list)]


def _expected(direct, tokens, num_scored):
  """(sum of log p, all argmax) of the last num_scored of `tokens`, by one direct pass."""
  logprobs = direct(tokens[:-1])
  positions = np.arange(len(tokens) - 1 - num_scored, len(tokens) - 1)
  targets = np.asarray(tokens[1:])[positions]
  return (float(np.sum(logprobs[positions, targets], dtype=np.float64)),
          bool(np.all(logprobs[positions].argmax(-1) == targets)))


def test_the_command_line_arguments_reach_the_model(lm, eval_run):
  config, _, _, _ = eval_run
  assert lm.batch_size == 4 and lm.max_length == config.data.seq_len
  assert lm.eval_model.step == 5 and lm.eval_model.model.folded
  assert lm.eot_token_id == config.data.eod_id


def test_the_config_file_and_the_workdir_config_agree(eval_run):
  _, config_path, workdir, _ = eval_run
  from_file = scoring.load_config(workdir, config_path)
  from_workdir = scoring.load_config(str(pathlib.Path(workdir) / 'checkpoints' / '5'))
  assert from_file.model.to_dict() == from_workdir.model.to_dict()
  assert from_file.data.seq_len == from_workdir.data.seq_len
  with pytest.raises(FileNotFoundError, match='no such file'):
    scoring.load_config(workdir, 'configs/missing.py:arg')


def test_loglikelihood_equals_a_direct_forward_pass(lm, direct):
  tokenizer = load_tokenizer('qwen3')
  long_context = 'import os\nimport sys\n' * 30  # > max_length tokens: cut from the left
  pairs = [('Question: Which animal says meow?\nAnswer:', ' a cat'),
           ('def main(', 'argv):\n  return 0'),
           ('The sky is ', 'blue'),  # the trailing space moves to the continuation
           ('', 'Hello world'),  # empty context: the end-of-document token conditions
           (long_context, '\ndef main():\n  pass')]
  results = lm.loglikelihood(_requests('loglikelihood', pairs))

  for (context, continuation), (logprob, is_greedy) in zip(pairs, results):
    if context:
      stripped = context.rstrip()  # lm-eval moves trailing spaces to the continuation
      context, continuation = stripped, context[len(stripped):] + continuation
      context_ids = tokenizer.encode(context)
      continuation_ids = tokenizer.encode(context + continuation)[len(context_ids):]
    else:
      context_ids, continuation_ids = [tokenizer.eod_id], tokenizer.encode(continuation)
    tokens = (context_ids + continuation_ids)[-(lm.max_length + 1):]
    expected_logprob, expected_greedy = _expected(direct, tokens, len(continuation_ids))
    assert logprob == pytest.approx(expected_logprob, abs=TOL)
    assert is_greedy == expected_greedy
  assert len(tokenizer.encode(long_context)) > lm.max_length


def test_is_greedy_is_true_exactly_for_the_argmax_continuation(lm, direct):
  context = load_tokenizer('qwen3').encode('def parse_args(')
  greedy = []
  for _ in range(4):
    greedy.append(int(direct(context + greedy)[-1].argmax()))
  runner_up = int(np.argsort(direct(context + greedy[:1])[-1])[-2])
  not_greedy = greedy[:1] + [runner_up] + greedy[2:]

  results = lm._loglikelihood_tokens([(('', ''), context, greedy), (('', ''), context, not_greedy)],
                                     disable_tqdm=True)
  assert [is_greedy for _, is_greedy in results] == [True, False]
  assert results[0][0] == pytest.approx(_expected(direct, context + greedy, 4)[0], abs=TOL)


def test_loglikelihood_rolling_sums_every_token_once_over_disjoint_windows(lm, direct):
  tokenizer = load_tokenizer('qwen3')
  text = 'The quick brown fox jumps over the lazy dog, and then it runs away into the forest.'
  t = tokenizer.encode(text)
  assert len(t) == 19
  short_lm = MekiLM(lm.eval_model, tokenizer, batch_size=2, max_length=8)
  # lm-eval's windows for 19 tokens and max_length 8: the first conditions on the
  # end-of-document token, the next on the token before it, the last gets a full context.
  windows = [([tokenizer.eod_id] + t[:8], 8), (t[7:16], 8), (t[10:19], 3)]
  expected = sum(_expected(direct, tokens, scored)[0] for tokens, scored in windows)
  whole = _expected(direct, [tokenizer.eod_id] + t, 19)[0]  # one window: max_length 64

  results = lm.loglikelihood_rolling(_requests('loglikelihood_rolling', [(text,), ('',)]))
  short = short_lm.loglikelihood_rolling(_requests('loglikelihood_rolling', [(text,)]))
  assert results[0] == pytest.approx(whole, abs=TOL)
  assert results[1] == 0.0
  assert short[0] == pytest.approx(expected, abs=TOL)


def test_generate_until_is_greedy_and_stops_at_the_until_string(lm, direct):
  tokenizer = load_tokenizer('qwen3')
  prompt = 'def main():\n'
  context = tokenizer.encode(prompt)
  greedy = []
  for _ in range(10):
    greedy.append(int(direct(context + greedy)[-1].argmax()))
  assert tokenizer.eod_id not in greedy
  full_text = tokenizer.decode(greedy)
  stop = full_text[len(tokenizer.decode(greedy[:5])):][:3]  # text from the 6th token on
  assert stop

  results = lm.generate_until(_requests('generate_until', [
      (prompt, {'until': [stop], 'max_gen_toks': 10}),
      (prompt, {'until': ['never appears'], 'max_gen_toks': 4, 'do_sample': False}),
      (prompt, {'until': stop, 'max_gen_toks': 10})]))
  assert results[0] == full_text[:full_text.index(stop)]
  assert results[1] == tokenizer.decode(greedy[:4])
  assert results[2] == results[0]


def test_sampling_requests_are_refused(lm):
  with pytest.raises(ValueError, match='generates greedily'):
    lm.generate_until(_requests('generate_until', [('x', {'do_sample': True,
                                                          'temperature': 0.7})]))


def test_toy_multiple_choice_task_scores_acc_and_acc_norm(lm, monkeypatch):
  monkeypatch.chdir(REPO)  # the task's data_files path is relative to the repository
  tasks = TaskManager(include_path=str(TASK_DIR), include_defaults=False)  # ours only: fast
  output = simple_evaluate(model=lm, tasks=['meki_toy_choice'], task_manager=tasks,
                           bootstrap_iters=0)
  metrics = output['results']['meki_toy_choice']

  docs = [json.loads(line) for line in (TASK_DIR / 'toy_choice.jsonl').read_text().splitlines()]
  hits, norm_hits = [], []
  for doc in docs:
    context = f'Question: {doc["question"]}\nAnswer:'
    lls = np.array([ll for ll, _ in lm.loglikelihood(
        _requests('loglikelihood', [(context, ' ' + choice) for choice in doc['choices']]))])
    # lm-eval's acc_norm divides by the choice's length in characters (acc_bytes uses bytes).
    chars = np.array([len(choice) for choice in doc['choices']], float)
    hits.append(np.argmax(lls) == doc['label'])
    norm_hits.append(np.argmax(lls / chars) == doc['label'])
  assert metrics['acc,none'] == pytest.approx(np.mean(hits))
  assert metrics['acc_norm,none'] == pytest.approx(np.mean(norm_hits))


@pytest.mark.slow
def test_command_line_finds_the_model_and_runs_a_task(eval_run, tmp_path):
  _, config_path, workdir, _ = eval_run
  env = {**os.environ, 'HF_DATASETS_OFFLINE': '1', 'HF_HUB_OFFLINE': '1', 'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run(
      [sys.executable, '-m', 'meki_jax.eval', '--model', 'meki_jax', '--model_args',
       f'workdir={workdir},config={config_path},batch_size=4', '--tasks', 'meki_toy_choice',
       '--include_path', str(TASK_DIR), '--output_path', str(tmp_path)],
      cwd=REPO, env=env, capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'meki_toy_choice' in result.stdout and 'acc_norm' in result.stdout
