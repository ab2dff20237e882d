"""Defaults shared by every config: the backbone constants and the paper's training recipe.

Spec sections 1 and 6, and the PLE and Engram baselines of spec Table 2 (off unless enabled).
Size files (`meki_1p7b.py`, ...) override the model shape; everything here is a number a user
may change from the command line (`--config.optim.peak_lr=3e-4`).
"""

import ml_collections

QWEN3_VOCAB_SIZE = 151_680  # 151,669 Qwen3 tokens padded up to a multiple of 128.
QWEN3_EOD_ID = 151_643  # <|endoftext|>


def model_config(*, num_layers, d_model, num_heads, num_kv_heads, d_ff, d_mem):
  """A Qwen3 backbone with the MeKi branch (spec sections 1, 2 and 4).

  The PLE and Engram sections are sized from d_mem to the ROM of spec Table 2: PLE's table
  [V, L * d_ple] with d_ple = d_mem holds as many values as MeKi's L tables [V, d_mem]; Engram's
  two layers x 2 orders x 8 heads x 2V rows x d_mem / 2 values hold 8/7 of that at L = 28
  (0.62B / 0.54B at 0.6B, 1.24B / 1.09B at 1.7B).
  """
  return ml_collections.ConfigDict(dict(
      vocab_size=QWEN3_VOCAB_SIZE,
      num_layers=num_layers,
      d_model=d_model,
      num_heads=num_heads,
      num_kv_heads=num_kv_heads,
      head_dim=128,
      d_ff=d_ff,
      rope_theta=500_000.0,
      norm_eps=1e-6,
      qk_norm=True,
      init_std=0.014,
      # paper: spec sections 1-2 (the default); authors_release: the network the authors'
      # released Megatron code trains (spec section 6a); set it with `:flavor=` (apply_arguments).
      flavor='paper',
      dtype='bfloat16',  # activations; parameters stay in param_dtype
      param_dtype='float32',
      remat_policy='mlp',  # none | mlp | mlp_qkv | full; mlp: the recipe's selective recompute
      # activations the remat policy keeps that live in host memory instead of HBM, of
      # layer_input | query | key | value | context | attn_out (model/remat.py)
      remat_offload=(),
      attention='auto',  # auto | xla | blocked | splash (model/attention.py)
      attention_block=512,  # positions per block of the blocked and splash attentions
      loss_chunk_len=256,  # positions per chunk of the logits in the loss (0 = whole sequence)
      # where MeKi's equations (1)-(3) run: auto | tokens | vocabulary (model/meki.py)
      memory_mix='auto',
      # compute the kernel gradients of the FFN gate/up (and down, with MeKi parallel to the
      # FFN and remat other than full) and MeKi's output projection together with their input
      # gradients (lower peak memory; model/layers.py, Dense)
      weight_grad_first=True,
      meki=ml_collections.ConfigDict(dict(
          enabled=d_mem > 0,
          d_mem=d_mem,
          memory='both',  # static | dynamic | both
          fusion='add_sigmoid',  # add_sigmoid | mul_sigmoid | add_silu | mul_silu
          position='parallel_ffn',  # parallel_ffn | parallel_attention | after_attention | after_ffn
          projection='swiglu',  # swiglu | linear
      )),
      ple=ml_collections.ConfigDict(dict(  # per-layer embeddings (Gemma 3n), model/ple.py
          enabled=False,
          d_ple=d_mem,
      )),
      engram=ml_collections.ConfigDict(dict(  # hashed n-gram memory (DeepSeek), model/engram.py
          enabled=False,
          # the layers that get Engram, before their attention: 1 and L/2 (one layer when L <= 3)
          layers=tuple(sorted({min(1, num_layers - 1), num_layers // 2})),
          ngram_orders=(2, 3),
          num_heads=8,  # hash heads per order
          head_width=d_mem // 2,  # values per table row
          rows_per_head=2 * QWEN3_VOCAB_SIZE,
          conv_kernel=4,
          seed=0,  # of the hash multipliers
      )),
  ))


def get_config(arg=None):
  """The training recipe of spec section 6 around a placeholder model (size files set it)."""
  del arg
  config = ml_collections.ConfigDict()
  config.model = model_config(num_layers=2, d_model=256, num_heads=2, num_kv_heads=1, d_ff=512,
                              d_mem=32)
  config.data = ml_collections.ConfigDict(dict(
      seq_len=4096,
      tokenizer='qwen3',  # 'qwen3' (packaged BPE ranks) or a path to a Hugging Face tokenizer.json
      eod_id=QWEN3_EOD_ID,
      # Each source: dict(path=<glob of ArrayRecord token shards>, weight=<mixture weight>).
      # 'embedded:python-stdlib' is the corpus every machine has (the Python standard library).
      # Tuples, so the command line can replace them:
      #   --config.data.train_sources='({"path": "shards/*.arrayrecord", "weight": 1.0},)'
      train_sources=(dict(path='embedded:python-stdlib', weight=1.0),),
      eval_sources=(),  # empty: hold out eval_fraction of train_sources' documents
      eval_fraction=0.01,
      # Megatron's --eod-mask-loss (spec section 6): no loss where the INPUT is end-of-document;
      # a document's final EOD is a target, so the model learns to end documents.
      mask_eod_input=True,
      # documents: each document its own segment, positions reset per document (spec 6);
      # stream: megatron-core's rows, windows of the concatenated token stream with positions
      # 0..seq_len-1 and causal attention across documents (spec 6a point 6; data/packing.py).
      packing='documents',
      shuffle_seed=0,
      num_workers=0,  # grain worker processes; 0 = read in the main process
      prefetch_buffer=16,
  ))
  config.train = ml_collections.ConfigDict(dict(
      seed=0,
      num_steps=50_000,
      global_batch_size=256,  # sequences per optimizer step
      grad_accum_steps=1,  # micro-batches per optimizer step
      log_every=10,
      eval_every=1000,
      eval_batches=8,
      checkpoint_every=1000,
      keep_checkpoints=3,
      init_from_hf='',  # a Hugging Face Qwen3 directory: start the backbone from its weights
  ))
  config.optim = ml_collections.ConfigDict(dict(
      peak_lr=4e-4,
      end_lr=2e-4,  # cosine floor
      warmup_steps=500,
      schedule_steps=-1,  # length of the cosine; -1 = train.num_steps (set it to stop early)
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      clip_norm=1.0,
      # keep the fp32 parameters / the Adam moments in the host's pinned memory and stream
      # them into HBM each step (train/state.py)
      params_on_host=False,
      opt_state_on_host=False,
  ))
  config.mesh = ml_collections.ConfigDict(dict(
      # Sizes of the mesh axes; -1 takes the devices the other axes leave.
      shape=ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1)),
      # Logical axis -> mesh axes (meki_jax/sharding.py lists the logical names).
      # Memory tables shard over vocab so that no device holds a whole table.
      axis_rules=[
          ('batch', ('data', 'fsdp')),
          ('vocab', ('fsdp', 'tensor')),
          ('embed', 'fsdp'),
          # The first rule whose mesh axes are still free applies: the FFN kernels' 'mlp' axis
          # goes to 'tensor' (their 'embed' took 'fsdp'); a kernel without 'embed' (G's down
          # projection [mlp, mem]) is sharded over both.
          ('mlp', ('fsdp', 'tensor')),
          ('mlp', 'tensor'),
          ('heads', 'tensor'),
          ('kv_heads', 'tensor'),
          ('mem', None),
          ('ple', None),
          ('engram', None),
          ('head_dim', None),
          ('layers', None),
          ('length', None),
      ],
  ))
  return config


VARIANT_KEYS = {'memory': str, 'fusion': str, 'position': str, 'projection': str, 'd_mem': int}
ARGUMENT_KEYS = ('flavor',) + tuple(VARIANT_KEYS)


def apply_flavor(config, flavor):
  """Sets `config.model.flavor` and what the flavor implies elsewhere in the config.

  authors_release (spec section 6a) also turns off the q/k RMSNorm (point 4) and packs rows as
  megatron-core does (point 6: `data.packing='stream'`); either can be set back from the command
  line afterwards. Validation names a bad flavor.
  """
  config.model.flavor = flavor
  release = flavor == 'authors_release'
  config.model.qk_norm = not release
  if 'data' in config:
    config.data.packing = 'stream' if release else 'documents'
  return config


def apply_arguments(config, arg, keys=ARGUMENT_KEYS):
  """Applies a config argument 'key=value,key=value' (keys from `keys`) to `config`.

  `configs/meki_1p7b.py:flavor=authors_release` trains the authors' released network;
  `configs/meki_0p6b.py:memory=static` is the static-only ablation of spec Table 3 (the keys of
  VARIANT_KEYS set `config.model.meki`). Validation of the values happens in meki_jax.config.
  """
  if not arg:
    return config
  for item in arg.split(','):
    key, sep, value = item.partition('=')
    if not sep or key not in keys:
      raise ValueError(f'config argument {item!r}: expected key=value with key in '
                       f'{sorted(keys)}')
    if key == 'flavor':
      apply_flavor(config, value)
    else:
      config.model.meki[key] = VARIANT_KEYS[key](value)
  config.model.meki.enabled = config.model.meki.d_mem > 0
  return config
