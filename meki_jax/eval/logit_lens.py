"""The logit lens: the prediction each layer would make if the network stopped after it.

The final RMSNorm and the tied unembedding are applied to the residual stream h_l after layer l:
p_l = softmax(E_global final_norm(h_l)). Per token the lens reports
    KL(p_final || p_l) = sum_v p_final(v) (log p_final(v) - log p_l(v)),
what the layers after l still change about the prediction, measured where the final
prediction puts its mass; it is 0 at the last layer. Spec section 7: averaged over validation
tokens, it is lower for MeKi than for dense at every layer.

`LogitLens` runs the Transformer's own DecoderLayer under the same nn.scan, with the same
parameters (training or folded form); the scan's per-layer outputs are the hidden states. It
covers MeKi and dense models: the PLE and Engram baselines feed their layers inputs that only
the Transformer computes, so the lens refuses them rather than leave their branches out.
"""

import functools
import io
import itertools
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from meki_jax import files
from meki_jax.model.layers import RMSNorm
from meki_jax.model.transformer import DecoderLayer, _embed_rows, _embedding

DIRECTION = 'KL(final || layer)'


class _EmittingLayer(DecoderLayer):
  """A DecoderLayer whose scan output is its hidden state, so the scan stacks every layer's."""

  @nn.compact
  def __call__(self, x, *args):
    x, _ = super().__call__(x, *args)
    return x, x


class LogitLens(nn.Module):
  """(token_ids, positions, segment_ids) [batch, seq] -> (hidden, kl).

  hidden [num_layers, batch, seq, d_model]: the residual stream after each layer;
  kl [num_layers, batch, seq] float32: KL(p_final || p_layer) per token.
  Parameters: those of `build_model(config, folded)`.
  """
  config: object  # FrozenConfigDict of config.model
  folded: bool = False

  @nn.compact
  def __call__(self, token_ids, positions, segment_ids):
    cfg = self.config
    for baseline in ('ple', 'engram'):
      if baseline in cfg and cfg[baseline].enabled:
        raise ValueError(f'the logit lens covers MeKi and dense models, not '
                         f'model.{baseline}.enabled=True')
    embed = _embedding(cfg)
    embed_rows = _embed_rows(cfg, embed, token_ids)
    layers = nn.scan(_EmittingLayer, variable_axes={'params': 0}, split_rngs={'params': True},
                     in_axes=nn.broadcast, length=cfg.num_layers,
                     metadata_params={nn.PARTITION_NAME: 'layers'})
    _, hidden = layers(cfg, self.folded, name='layers')(
        embed_rows, token_ids, embed_rows, positions, segment_ids)  # [layers, b, s, d_model]
    final_norm = RMSNorm(axis='embed', eps=cfg.norm_eps, dtype=jnp.dtype(cfg.dtype),
                         param_dtype=jnp.dtype(cfg.param_dtype), name='final_norm')

    def log_probs(x):  # [b, s, d_model] -> [b, s, vocab], as the Transformer's output
      return jax.nn.log_softmax(embed.attend(final_norm(x)).astype(jnp.float32))

    final = log_probs(hidden[-1])
    # One layer at a time: a [batch, seq, vocab] array per layer, never all of them.
    kl = jnp.stack([jnp.sum(jnp.exp(final) * (final - log_probs(hidden[layer])), axis=-1)
                    for layer in range(cfg.num_layers)])
    return hidden, kl


@functools.partial(jax.jit, static_argnames=('lens',))
def _kl_sums(lens, params, inputs, positions, segment_ids, loss_mask):
  """-> (sum over tokens of loss_mask * KL [num_layers], sum of loss_mask)."""
  _, kl = lens.apply({'params': params}, inputs, positions, segment_ids)
  return jnp.sum(kl * loss_mask, axis=(1, 2)), jnp.sum(loss_mask)


def mean_layer_kl(eval_model, batches, num_batches):
  """Per-layer KL(final || layer) averaged over the loss-masked tokens of `num_batches` batches.

  eval_model: a scoring.EvalModel; batches: an iterable of pipeline batches (inputs,
  positions, segment_ids, loss_mask: [rows, seq]), e.g. make_eval_dataset. Returns a report
  dict: direction, step, batches, tokens, kl (list, one per layer, layer 1 first).
  """
  lens = LogitLens(eval_model.model.config, eval_model.model.folded)
  kl_sum, tokens, used = 0.0, 0.0, 0
  with jax.set_mesh(eval_model.mesh), nn.logical_axis_rules(eval_model.rules):
    for batch in itertools.islice(batches, num_batches):
      arrays = [eval_model.put_batch(batch[key])
                for key in ('inputs', 'positions', 'segment_ids', 'loss_mask')]
      batch_kl, batch_tokens = _kl_sums(lens, eval_model.params, *arrays)
      kl_sum = kl_sum + np.asarray(batch_kl, np.float64)
      tokens += float(batch_tokens)
      used += 1
  if tokens == 0:
    raise ValueError(f'the {used} evaluation batches hold no loss tokens')
  return {'direction': DIRECTION, 'step': eval_model.step, 'batches': used,
          'tokens': int(tokens), 'kl': [float(value) for value in kl_sum / tokens]}


def format_table(report):
  """The report as a text table: one row per layer."""
  lines = [f'logit lens, step {report["step"]}: {report["direction"]} in nats, mean over '
           f'{report["tokens"]:,} tokens ({report["batches"]} batches)',
           f'{"layer":>5}  {"KL":>10}']
  lines += [f'{layer:>5}  {kl:>10.5f}' for layer, kl in enumerate(report['kl'], 1)]
  return '\n'.join(lines)


def write_report(report, out_dir):
  """Writes logit_lens.json and logit_lens.png (KL against layer) to out_dir; returns both paths."""
  from matplotlib.figure import Figure  # draws with Agg, without pyplot's global state

  out_dir = files.make_directory(out_dir)  # local or gs://
  json_path, png_path = out_dir / 'logit_lens.json', out_dir / 'logit_lens.png'
  json_path.write_text(json.dumps(report, indent=2) + '\n')
  figure = Figure(figsize=(6, 4), layout='tight')
  axes = figure.subplots()
  layers = range(1, len(report['kl']) + 1)
  axes.plot(layers, report['kl'], marker='o')
  axes.set(xlabel='layer', ylabel=f'{report["direction"]} (nats)', xticks=list(layers),
           title=f'logit lens, step {report["step"]}, {report["tokens"]:,} tokens')
  axes.grid(alpha=0.3)
  image = io.BytesIO()
  figure.savefig(image, format='png', dpi=120)
  png_path.write_bytes(image.getvalue())
  return json_path, png_path
