"""MeKi-4B (spec Table 5) trained with the recipe of spec section 6.

`--config=configs/meki_4b.py:memory=static,d_mem=96` selects a variant (spec section 4;
keys: memory, fusion, position, projection, d_mem), `:flavor=authors_release` the network of the
authors' released code (spec section 6a; default flavor=paper)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(
      num_layers=36, d_model=2560, num_heads=32, num_kv_heads=8,
      d_ff=9728, d_mem=512)
  base.apply_arguments(config, arg)
  return config
