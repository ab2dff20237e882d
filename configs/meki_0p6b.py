"""MeKi-0.6B (spec Table 5) trained with the recipe of spec section 6.

`--config=configs/meki_0p6b.py:memory=static,d_mem=96` selects a variant (spec section 4;
keys: memory, fusion, position, projection, d_mem), `:flavor=authors_release` the network of the
authors' released code (spec section 6a; default flavor=paper)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(
      num_layers=28, d_model=1024, num_heads=16, num_kv_heads=8,
      d_ff=3072, d_mem=128)
  base.apply_arguments(config, arg)
  return config
