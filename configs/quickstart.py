"""The quick start: a small MeKi model on the embedded Python-stdlib corpus, a few CPU minutes.

Real Qwen3 vocabulary (151,680 rows), so the embedding and the memory tables dominate the
parameter count: 4 layers, d_model 96, d_mem 32. About 3 minutes on 2 CPU cores.
"""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(num_layers=4, d_model=96, num_heads=4, num_kv_heads=2,
                                   d_ff=288, d_mem=32)
  config.model.head_dim = 24
  config.model.dtype = 'float32'  # CPUs have no fast bf16 matmuls
  config.model.remat_policy = 'none'
  base.apply_arguments(config, arg)
  config.data.seq_len = 128
  config.train.num_steps = 120
  config.train.global_batch_size = 8
  config.train.log_every = 10
  config.train.eval_every = 40
  config.train.eval_batches = 4
  config.train.checkpoint_every = 40
  config.optim.peak_lr = 3e-3
  config.optim.end_lr = 3e-4
  config.optim.warmup_steps = 12
  return config
