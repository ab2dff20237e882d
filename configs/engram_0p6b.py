"""Engram-0.6B: the MeKi-0.6B backbone with DeepSeek's hashed n-gram memory instead of MeKi
(spec Table 2 baseline): layers 1 and L/2, 2- and 3-grams, 8 hash heads of 2V rows each."""

from configs import base


def get_config(arg=None):
  del arg
  config = base.get_config()
  config.model = base.model_config(
      num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8,
      d_ff=3072, d_mem=128)
  config.model.meki.enabled = False
  config.model.engram.enabled = True
  return config
