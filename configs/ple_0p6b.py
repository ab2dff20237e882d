"""PLE-0.6B: the MeKi-0.6B backbone with Gemma 3n per-layer embeddings instead of MeKi (spec
Table 2 baseline). d_ple = d_mem, so the table [V, L * d_ple] is as large as MeKi's ROM."""

from configs import base


def get_config(arg=None):
  del arg
  config = base.get_config()
  config.model = base.model_config(
      num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8,
      d_ff=3072, d_mem=128)
  config.model.meki.enabled = False
  config.model.ple.enabled = True
  return config
