"""Model FLOPs per token, the one formula behind the logged TFLOP/s and MFU.

Derived from the config, never from XLA's cost analysis, which counts an `nn.scan` body once
and so reports 1/num_layers of a scanned model's work. A multiply-add is 2 FLOPs; training is
3x the forward pass (forward, and backward for activations and for weights); rematerialised
recomputation is not counted (these are model FLOPs, as in MFU).

Forward FLOPs per token:
  dense matmuls, per layer   2 * (d*H*hd + 2*d*KV*hd + H*hd*d + 3*d*d_ff)
  attention, per layer       4 * S * H * hd   (QK^T and AV over the full row; the causal and
                                               document masks are not exploited by the kernel)
  logits                     2 * d * V
  MeKi, per layer            2 * (d*d/2 * 2 + d/2 * m)   projection G (SwiGLU; linear: 2*d*m)
                           + 2 * d * m + 2 * m * d       W_gate and W_out
                           = 2 d^2 + 5 d m for SwiGLU: twice the spec's "d^2 + (5/2) d m"
                             multiply-adds; the folded model keeps only the 4 d m of W_gate/W_out.
                           + 4 * d                       authors_release: G's input RMSNorm with
                                                         its gain (square, mean, normalise, gain);
                                                         the other norms are not counted
                             These are the model's FLOPs per token. With model.memory_mix =
                             'vocabulary' (the default at the recipe's shape) a step runs G on
                             the vocab_size rows of E instead of on its tokens: 151,680 rows
                             against 1,048,576 tokens, 6.9x fewer G FLOPs than counted here.
  PLE (p = d_ple)            2 * d * L * p   (the embedding's projection to every layer's input)
                           + L * 4 * d * p   (each layer's gate d -> p and up-projection p -> d)
  Engram, per Engram layer   4 * E * d + 2 * d + 2 * k * d   (key and value E -> d with
                               E = orders * heads * head_width, the gate's dot, the k-tap conv)
"""

from meki_jax.model.meki import authors_release
from meki_jax.model.transformer import meki_enabled

# Peak dense bf16 TFLOP/s per chip, for MFU (public spec sheets).
PEAK_TFLOPS = {'TPU v4': 275.0, 'TPU v5 lite': 197.0, 'TPU v5e': 197.0, 'TPU v5p': 459.0,
               'TPU v5': 459.0, 'TPU v6 lite': 918.0, 'TPU v6e': 918.0}


def meki_forward_flops_per_token(model_config):
  """MeKi's training-form forward FLOPs per token, all layers."""
  if not meki_enabled(model_config):
    return 0
  d, m = model_config.d_model, model_config.meki.d_mem
  projection = 0
  if model_config.meki.memory != 'static':
    projection = (2 * (d * (d // 2) * 2 + (d // 2) * m) if model_config.meki.projection == 'swiglu'
                  else 2 * d * m)
    if authors_release(model_config):
      projection += 4 * d  # G's input RMSNorm (spec 6a point 2)
  return model_config.num_layers * (projection + 4 * d * m)


def baseline_forward_flops_per_token(model_config):
  """The PLE and Engram baselines' forward FLOPs per token (0 when they are off)."""
  cfg, total = model_config, 0
  d = cfg.d_model
  if 'ple' in cfg and cfg.ple.enabled:
    total += 2 * d * cfg.num_layers * cfg.ple.d_ple + cfg.num_layers * 4 * d * cfg.ple.d_ple
  if 'engram' in cfg and cfg.engram.enabled:
    engram = cfg.engram
    width = len(engram.ngram_orders) * engram.num_heads * engram.head_width
    total += len(engram.layers) * (4 * width * d + 2 * d + 2 * engram.conv_kernel * d)
  return total


def forward_flops_per_token(model_config, seq_len):
  cfg = model_config
  d, heads, kv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
  dense = 2 * (d * heads * hd + 2 * d * kv * hd + heads * hd * d + 3 * d * cfg.d_ff)
  attention = 4 * seq_len * heads * hd
  logits = 2 * d * cfg.vocab_size
  return (cfg.num_layers * (dense + attention) + logits + meki_forward_flops_per_token(cfg)
          + baseline_forward_flops_per_token(cfg))


def train_flops_per_token(model_config, seq_len):
  """Training FLOPs per token: 3 x forward."""
  return 3 * forward_flops_per_token(model_config, seq_len)


def peak_tflops(device_kind):
  """Peak bf16 TFLOP/s of a device kind, or None when unknown (e.g. CPU: no MFU is logged)."""
  for name, tflops in PEAK_TFLOPS.items():
    if device_kind.startswith(name):
      return tflops
  return None
