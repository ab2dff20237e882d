"""Engram-1.7B: the MeKi-1.7B backbone with DeepSeek's hashed n-gram memory instead of MeKi
(spec Table 2 baseline): layers 1 and L/2, 2- and 3-grams, 8 hash heads of 2V rows each."""

from configs import base


def get_config(arg=None):
  del arg
  config = base.get_config()
  config.model = base.model_config(
      num_layers=28, d_model=2048, num_heads=16, num_kv_heads=8,
      d_ff=6144, d_mem=256)
  config.model.meki.enabled = False
  config.model.engram.enabled = True
  return config
