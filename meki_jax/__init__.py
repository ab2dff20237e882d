"""meki-jax: pretrain MeKi language models in JAX/Flax and export them for phones.

Kept free of imports so that `meki_jax.export.torch_*` can be used without jax installed.
"""
