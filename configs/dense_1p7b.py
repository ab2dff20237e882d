"""Dense Qwen3-1.7B: the MeKi-1.7B backbone without the memory branch (spec Table 1 baseline).

`--config=configs/dense_1p7b.py:flavor=authors_release`: the authors' released backbone
(spec section 6a)."""

from configs import base


def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(
      num_layers=28, d_model=2048, num_heads=16, num_kv_heads=8,
      d_ff=6144, d_mem=0)
  base.apply_arguments(config, arg, keys=('flavor',))
  return config
