"""Dense Qwen3-4B: the MeKi-4B backbone without the memory branch (spec Table 1 baseline).

`--config=configs/dense_4b.py:flavor=authors_release`: the authors' released backbone
(spec section 6a)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(
      num_layers=36, d_model=2560, num_heads=32, num_kv_heads=8,
      d_ff=9728, d_mem=0)
  base.apply_arguments(config, arg, keys=('flavor',))
  return config
