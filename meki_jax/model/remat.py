"""What each layer keeps for its backward pass (`config.model.remat_policy`) and where it keeps
it (`config.model.remat_offload`: HBM, or the host's pinned memory).

The layers run under `nn.remat` with a policy over the activations the model names with
`checkpoint_name`: 'layer_input' (the layer's input, the scan carry), 'query', 'key', 'value'
(after q/k RMSNorm and RoPE), 'context' (what the attention's backward needs of its forward:
attention.self_attention), 'attn_out' (the output projection). Each layer's input is always kept.
Per-device memory of each policy at the recipe's shape: README, "Will it fit?".

Offloaded activations are copied to host memory as the forward pass makes them and back as the
backward pass needs them (XLA overlaps the copies with compute); HBM then holds none of them
across the layer loop. The splash kernel's context is the exception: its residuals belong to a
custom_vjp, and with them offloadable jax runs the kernel's forward again in the backward pass
(+554 TFLOP per step at dense_1p7b's recipe shape) instead of bringing them back, so validation
refuses to offload 'context' unless the attention is xla or blocked.
"""

import jax

REMAT_POLICIES = ('none', 'mlp', 'mlp_qkv', 'full')
OFFLOADABLE = ('layer_input', 'query', 'key', 'value', 'context', 'attn_out')


def saved_names(model_config):
  """The named activations `model_config.remat_policy` keeps; None for 'none' (keeps all).

  - 'mlp', Megatron's selective recompute: the attention's q, k, v, its context and the output
    projection are kept; the norms, the FFN's hidden activations and the MeKi branch (an MLP
    parallel to the FFN) are recomputed. With q/k RMSNorm (model.qk_norm) the backward pass runs
    the q and k projections again whatever is kept (the norm's gradient needs their pre-norm
    values), so q and k are not kept: the norm and RoPE are recomputed from those projections
    (elementwise), which saves 192 MiB per layer and device at 1.7B.
  - 'mlp_qkv': only the context and the output projection; q, k and v are recomputed (the v
    projection runs again, and q's and k's without q/k RMSNorm).
  - 'full': nothing but each layer's input.
  """
  policy = model_config.remat_policy
  if policy == 'none':
    return None
  if policy == 'mlp':
    return (() if model_config.qk_norm else ('query', 'key')) + ('value', 'context', 'attn_out')
  if policy == 'mlp_qkv':
    return ('context', 'attn_out')
  if policy == 'full':
    return ()
  raise ValueError(f'model.remat_policy={policy!r} is not one of {REMAT_POLICIES}')


def offloadable_names(model_config):
  """What `model_config.remat_offload` may name: each layer's input and what the policy keeps."""
  return ('layer_input',) + (saved_names(model_config) or ())


def checkpoint_policy(model_config):
  """The `jax.checkpoint` policy of each layer, or None (no remat) for 'none'.

  The names in model_config.remat_offload are kept in pinned host memory, the others in HBM.
  """
  names = saved_names(model_config)
  if names is None:
    return None
  offload = tuple(model_config.remat_offload)
  if not offload:
    return jax.checkpoint_policies.save_only_these_names(*names)
  return jax.checkpoint_policies.save_and_offload_only_these_names(
      names_which_can_be_saved=[name for name in names if name not in offload],
      names_which_can_be_offloaded=list(offload), offload_src='device', offload_dst='pinned_host')
