"""Spec Tables 2 and 3 at CPU scale: six runs that differ only in the storage method.

`--config=configs/repro.py:<variant>[,flavor=authors_release]` with variant one of
  dense    the backbone alone
  meki     MeKi, static + dynamic memory (the default)
  static   MeKi, static memory only (spec Table 3)
  dynamic  MeKi, dynamic memory only (spec Table 3)
  ple      Gemma 3n per-layer embeddings (spec Table 2)
  engram   DeepSeek's hashed n-gram memory at layers 1 and 2 (spec Table 2)
The quick start's backbone (4 layers, d_model 96, real Qwen3 vocabulary) and corpus, trained
longer. ROM: MeKi, static and PLE hold 4 x V x 32 = 19.4M values; Engram 2 layers x 2 orders x
8 heads x V/4 rows x 16 = the same 19.4M (at full scale it holds 8/7 of MeKi's, spec Table 2).
Compare the final eval_loss in each workdir's metrics.jsonl. `flavor=authors_release` (spec
section 6a; dense and MeKi variants) trains the network of the authors' released code instead of
the paper's equations.
"""

from configs import base, quickstart

VARIANTS = ('dense', 'meki', 'static', 'dynamic', 'ple', 'engram')


def get_config(arg=None):
  variant, _, arguments = (arg or 'meki').partition(',')
  if variant not in VARIANTS:
    raise ValueError(f'configs/repro.py:{variant}: the variant must be one of {VARIANTS}')
  config = quickstart.get_config(arguments)
  model = config.model
  model.meki.enabled = variant in ('meki', 'static', 'dynamic')
  if variant in ('static', 'dynamic'):
    model.meki.memory = variant
  model.ple.enabled = variant == 'ple'
  model.engram.enabled = variant == 'engram'
  model.engram.rows_per_head = base.QWEN3_VOCAB_SIZE // 4
  config.train.num_steps = 400
  config.train.eval_every = 100
  config.train.eval_batches = 8
  config.train.checkpoint_every = 200
  config.optim.warmup_steps = 40
  return config
