"""lm-evaluation-harness on a meki-jax checkpoint: the model 'meki_jax'.

  python -m meki_jax.eval --model meki_jax --batch_size 8 --tasks arc_easy,piqa \
      --model_args workdir=runs/quickstart[,config=configs/quickstart.py,folded=False]

Importing this module registers the model (lm-eval has no plugin discovery for models, hence
the `python -m meki_jax.eval` wrapper). Text is tokenised with the run's tokenizer (Qwen3 by
default) and scored by the folded model unless folded=False. Conventions follow lm-eval's
Hugging Face model: an empty context is the end-of-document token, context + continuation is cut
from the left to max_length + 1 tokens (max_length defaults to config.data.seq_len), rolling
log-likelihoods use lm-eval's disjoint windows, and generation is greedy.
"""

import functools
import itertools

from lm_eval import utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from meki_jax import decode
from meki_jax.data.tokenizer import load_tokenizer
from meki_jax.eval import scoring
from meki_jax.model.transformer import build_model


def _positive_int(name, value):
  if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
    raise ValueError(f'meki_jax: {name}={value!r} must be a positive integer')
  return int(value)


def cut_at_stops(text, until):
  """`text` up to the first occurrence of any (non-empty) string of `until`."""
  for stop in until:
    if stop:
      text = text.split(stop, 1)[0]
  return text


@register_model('meki_jax')
class MekiLM(TemplateLM):
  """lm-eval's LM over a scoring.EvalModel; build it with `from_checkpoint` (the CLI does)."""

  def __init__(self, eval_model, tokenizer, batch_size=8, max_length=None, max_gen_toks=256):
    super().__init__()
    self.eval_model = eval_model
    self._tokenizer = tokenizer
    self.batch_size = _positive_int('batch_size', batch_size)
    self._max_length = _positive_int(
        'max_length', eval_model.config.data.seq_len if max_length is None else max_length)
    self.max_gen_toks = _positive_int('max_gen_toks', max_gen_toks)

  @classmethod
  def from_checkpoint(cls, workdir=None, config=None, folded=True, batch_size=8, max_length=None,
                      max_gen_toks=256, device=None, max_batch_size=None):
    """The model of a workdir's latest checkpoint (or a <workdir>/checkpoints/<step>).

    config: the run's config file 'configs/X.py[:arg]'; default <workdir>/config.json.
    `device` and `max_batch_size` are lm-eval's own arguments and are ignored: the mesh comes
    from config.mesh.
    """
    del device, max_batch_size
    if workdir is None:
      raise ValueError('meki_jax needs --model_args workdir=DIR[,config=configs/X.py]')
    full_config = scoring.load_config(workdir, config)
    eval_model = scoring.restore_eval_model(full_config, workdir, folded=folded)
    return cls(eval_model, load_tokenizer(full_config.data.tokenizer), batch_size, max_length,
               max_gen_toks)

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """--model_args win over lm-eval's own settings (its --batch_size always defaults to 1)."""
    additional = {key: value for key, value in (additional_config or {}).items()
                  if value is not None}
    return cls.from_checkpoint(**{**additional, **arg_dict})

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

  @property
  def eot_token_id(self):
    return self._tokenizer.eod_id

  @property
  def max_length(self):
    return self._max_length

  def tok_encode(self, string, add_special_tokens=None, **kwargs):
    """str -> token ids; the tokenizer adds no special tokens, so the flag changes nothing."""
    del add_special_tokens, kwargs
    return self._tokenizer.encode(string)

  def tok_decode(self, tokens):
    return self._tokenizer.decode(tokens)

  def _score(self, pairs, desc, disable_tqdm):
    with tqdm(total=len(pairs), desc=desc, disable=disable_tqdm) as bar:
      return scoring.score_continuations(self.eval_model, pairs, batch_size=self.batch_size,
                                         max_length=self.max_length, progress=bar.update)

  def _loglikelihood_tokens(self, requests, disable_tqdm=False):
    """[((context, continuation), context ids, continuation ids)] -> [(logprob, is_greedy)]."""
    results = self._score([(context, continuation) for _, context, continuation in requests],
                          'meki_jax loglikelihood', disable_tqdm)
    for (strings, _, _), result in zip(requests, results):
      self.cache_hook.add_partial('loglikelihood', strings, result)
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm=False):
    """The log-probability of each whole text, over lm-eval's disjoint max_length windows."""
    windows, owners = [], []
    for index, request in enumerate(requests):
      text, = request.args
      for window in utils.get_rolling_token_windows(
          token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
          max_seq_len=self.max_length, context_len=1):
        windows.append(utils.make_disjoint_window(window))
        owners.append(index)
    totals = [0.0] * len(requests)
    for owner, (logprob, _) in zip(owners, self._score(windows, 'meki_jax rolling windows',
                                                        disable_tqdm)):
      totals[owner] += logprob
    for request, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', request.args, total)
    return totals

  @functools.cached_property
  def _decoder(self):
    """(DecodeTransformer, its params): the scoring model's form, layers unrolled."""
    model_config = self.eval_model.config.model
    return (build_model(model_config, folded=self.eval_model.model.folded, decode=True),
            decode.decode_params(self.eval_model.params, model_config))

  def _generation_settings(self, gen_kwargs):
    """gen_kwargs -> (until strings, max_gen_toks); sampling is refused (we decode greedily).

    Other keys (top_p, top_k, ...) only shape sampling, so they change nothing here.
    """
    if gen_kwargs.get('do_sample') or gen_kwargs.get('temperature'):
      raise ValueError(f'meki_jax generates greedily; gen_kwargs {gen_kwargs} ask for sampling')
    until = gen_kwargs.get('until') or []
    until = [until] if isinstance(until, str) else list(until)
    max_gen_toks = _positive_int('max_gen_toks',
                                 gen_kwargs.get('max_gen_toks', self.max_gen_toks))
    if max_gen_toks >= self.max_length:
      raise ValueError(f'meki_jax: max_gen_toks={max_gen_toks} leaves no room for the prompt '
                       f'in max_length={self.max_length}')
    return tuple(until), max_gen_toks

  def generate_until(self, requests, disable_tqdm=False):
    """Greedy continuations, cut at the first `until` string; at most max_gen_toks tokens.

    A row stops early only at end-of-document (decode.generate knows no stop strings), so the
    tokens after a stop string are generated and dropped; greedy output is the same.
    """
    settings = [self._generation_settings(request.args[1]) for request in requests]
    model, params = self._decoder
    prompts = [self.tok_encode(request.args[0]) or [self.prefix_token_id]
               for request in requests]
    results = [None] * len(requests)
    by_settings = sorted(range(len(requests)), key=lambda i: (settings[i], -len(prompts[i])))
    with tqdm(total=len(requests), desc='meki_jax generate_until', disable=disable_tqdm) as bar:
      for (until, max_gen_toks), group in itertools.groupby(by_settings, key=settings.__getitem__):
        group = list(group)
        for start in range(0, len(group), self.batch_size):
          batch = group[start:start + self.batch_size]
          room = self.max_length - max_gen_toks  # prompts keep their last `room` tokens
          outputs = decode.generate(model, params, [prompts[i][-room:] for i in batch],
                                    max_new_tokens=max_gen_toks, eod_id=self.eot_token_id)
          for index, new_ids in zip(batch, outputs):
            results[index] = cut_at_stops(self.tok_decode(new_ids), until)
            self.cache_hook.add_partial('generate_until', requests[index].args, results[index])
          bar.update(len(batch))
    return results
