"""Dense Qwen3-1.7B: the MeKi-1.7B backbone without the memory branch (spec Table 1 baseline)."""

from configs import base


def get_config(arg=None):
  del arg
  config = base.get_config()
  config.model = base.model_config(
      num_layers=28, d_model=2048, num_heads=16, num_kv_heads=8,
      d_ff=6144, d_mem=0)
  return config
