"""Each source transform of the device programs against the eager model it replaces: the KV
cache kept in buffers (ExecuTorch's update_cache and custom_sdpa) gives the eager graph's logits
(the graph the earlier programs were, with the cache passed in and out) for every MeKi variant;
the in-graph dequantization is table_quant's; the quantizers change what they should."""

import collections

import numpy as np
import pytest
import torch

from meki_jax.export import device_model, table_quant, to_device, torch_model
from meki_jax.export.torch_model import MekiForCausalLM
from tests.export.test_torch_model import FAST_VARIANTS, TOLERANCE, torch_twin
from tests.export.conftest import moved_params

CACHE_LEN = 24


def eager_and_device(config, **device_kwargs):
  """(eager MekiForCausalLM, a DeviceModel built from an identical copy) of moved params."""
  params = moved_params(config)
  scheme = table_quant.TableScheme('float32') if config.meki.enabled else None
  device = device_model.build_device_model(torch_twin(params, config), cache_len=CACHE_LEN,
                                           scheme=scheme, **device_kwargs)
  return torch_twin(params, config), device


def eager_steps(model, tokens, rows, prompt_len):
  """The eager model's logits over `tokens` [1, n]: the prompt in one call, then one token a
  call, the cache passed in and out. rows: [1, n, L, m] or None."""
  key_cache, value_cache = model.empty_cache(1, CACHE_LEN)
  logits = []
  for start, stop in [(0, prompt_len)] + [(i, i + 1) for i in range(prompt_len, tokens.shape[1])]:
    step_rows = () if rows is None else (rows[:, start:stop],)
    step_logits, key_cache, value_cache = model(tokens[:, start:stop], torch.arange(start, stop),
                                                key_cache, value_cache, *step_rows)
    logits.append(step_logits)
  return torch.cat(logits, dim=1)


def device_steps(model, tokens, rows, prompt_len):
  """The same calls on a DeviceModel, whose cache lives in its buffers."""
  device_model.load_custom_ops()
  logits = []
  for start, stop in [(0, prompt_len)] + [(i, i + 1) for i in range(prompt_len, tokens.shape[1])]:
    step_rows = () if rows is None else (rows[:, start:stop],)
    logits.append(model(tokens[:, start:stop], torch.tensor([start]), *step_rows))
  return torch.cat(logits, dim=1)


def inputs(config, length=12, seed=0):
  generator = torch.Generator().manual_seed(seed)
  tokens = torch.randint(0, config.vocab_size, (1, length), generator=generator)
  rows = (torch.randn((1, length, config.num_layers, config.meki.d_mem), generator=generator)
          if config.meki.enabled else None)
  return tokens, rows


def assert_device_steps_match_eager(config, prompt_len):
  """The DeviceModel's logits over a prompt in one call, then one token a call, are the eager
  model's."""
  eager, device = eager_and_device(config, logits='all')
  tokens, rows = inputs(config)
  with torch.no_grad():
    expected = eager_steps(eager, tokens, rows, prompt_len=prompt_len)
    actual = device_steps(device, tokens, rows, prompt_len=prompt_len)
  np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize('variant', FAST_VARIANTS, ids=lambda v: '-'.join(map(str, v.values())))
def test_the_cache_in_buffers_gives_the_eager_logits(tiny_model_config, variant):
  assert_device_steps_match_eager(tiny_model_config(meki=variant), prompt_len=7)


@pytest.mark.parametrize('kv_heads', [1, 2, 4])
def test_decoding_every_token_from_slot_zero_gives_the_eager_logits(tiny_model_config, kv_heads):
  """One token a call from position 0 on: the decode attention's query rows per kv head (4, 2
  or 1 query heads per kv head) see exactly the slots written so far."""
  assert_device_steps_match_eager(tiny_model_config(num_kv_heads=kv_heads), prompt_len=1)


def test_a_new_prompt_overwrites_the_cache_from_slot_zero(tiny_model_config):
  """Slots past the current position are never read: a second, shorter sequence run through
  the same programs gives what a fresh model gives."""
  config = tiny_model_config()
  eager, device = eager_and_device(config, logits='all')
  first, first_rows = inputs(config, length=14, seed=1)
  second, second_rows = inputs(config, length=9, seed=2)
  with torch.no_grad():
    device_steps(device, first, first_rows, prompt_len=10)
    actual = device_steps(device, second, second_rows, prompt_len=5)
    expected = eager_steps(eager, second, second_rows, prompt_len=5)
  np.testing.assert_allclose(actual.numpy(), expected.numpy(), rtol=0, atol=TOLERANCE)


def test_last_logits_are_the_last_row_of_all(tiny_model_config):
  config = tiny_model_config()
  _, every = eager_and_device(config, logits='all')
  _, last = eager_and_device(config, logits='last')
  tokens, rows = inputs(config)
  device_model.load_custom_ops()
  with torch.no_grad():
    all_logits = every(tokens, torch.tensor([0]), rows)
    last_logits = last(tokens, torch.tensor([0]), rows)
  assert last_logits.shape == (1, 1, config.vocab_size)
  np.testing.assert_allclose(last_logits[:, 0].numpy(), all_logits[:, -1].numpy(), rtol=0,
                             atol=1e-6)


@pytest.mark.parametrize('scheme', [table_quant.TableScheme('int8'),
                                    table_quant.TableScheme('int4', 4),
                                    table_quant.TableScheme('float16')])
def test_the_programs_dequantize_as_table_quant_decodes(scheme):
  rows = np.random.default_rng(0).standard_normal((2, 3, 4, 8)).astype(np.float32)
  stored = scheme.encode(rows)
  program_inputs = tuple(torch.from_numpy(np.ascontiguousarray(array))
                         for array in scheme.split(stored, 8))
  np.testing.assert_array_equal(device_model.dequantize_rows(scheme, program_inputs).numpy(),
                                scheme.decode(stored, 8))


def test_8da4w_and_8w_quantize_every_linear_and_the_embedding(tiny_model_config):
  """All linear layers (the untied output projection too) hold int4 weight groups, the
  embedding int8 rows; the logits stay near the float model's (random weights: the tolerance is
  loose; the held-out losses of a trained model are in the README)."""
  config = tiny_model_config(d_model=64, d_ff=128, meki=dict(d_mem=32))
  eager, device = eager_and_device(config, logits='all', qlinear='8da4w', group_size=32,
                                   qembedding='8w')
  linears = [module for module in device.modules() if isinstance(module, torch.nn.Linear)]
  assert device.lm_head is not None and len(linears) == 2 * 9 + 1  # q k v o, FFN, MeKi x 2
  assert not any(type(module.weight) is torch.nn.Parameter for module in linears)
  program = torch.export.export(device, (torch.zeros((1, 3), dtype=torch.int64),
                                         torch.zeros(1, dtype=torch.int64),
                                         torch.zeros((1, 3, 2, 32))))
  targets = collections.Counter(str(node.target) for node in program.graph.nodes)
  # Per linear: its activations' scales chosen at run time and quantized, its weight and its
  # activations dequantized; the embedding's rows dequantized.
  assert targets['torchao.choose_qparams_affine.default'] == len(linears)
  assert targets['torchao.dequantize_affine.default'] == 2 * len(linears) + 1, targets
  tokens, rows = inputs(config)
  with torch.no_grad():
    expected = eager_steps(eager, tokens, rows, prompt_len=12)
    actual = device_steps(device, tokens, rows, prompt_len=12)
  # 4-bit weights sit up to half a step (max|group| / 14) off: on random weights the logits
  # move by about a tenth of their range (measured 0.13), not by all of it.
  error = (actual - expected).abs().max() / expected.abs().max()
  assert 0.01 < error < 0.3, float(error)


def test_a_scheme_is_required_exactly_for_meki(tiny_model_config):
  config = tiny_model_config()
  with pytest.raises(ValueError, match='needs the table scheme'):
    device_model.DeviceModel(MekiForCausalLM(config.to_dict()), cache_len=8)
  with pytest.raises(ValueError, match="logits='first' is not one of"):
    device_model.DeviceModel(MekiForCausalLM(config.to_dict()), cache_len=8,
                             scheme=table_quant.TableScheme('int8'), logits='first')
  with pytest.raises(ValueError, match=r"group_size=16 does not divide the input width of 2 .*"
                     r"'model.layers.0.meki.out_proj': 8"):
    device_model.build_device_model(MekiForCausalLM(config.to_dict()), cache_len=8,
                                    scheme=table_quant.TableScheme('int8'), qlinear='8da4w',
                                    group_size=16)
  with pytest.raises(ValueError, match="qlinear='4w'"):
    device_model.build_device_model(MekiForCausalLM(config.to_dict()), cache_len=8,
                                    scheme=table_quant.TableScheme('int8'), qlinear='4w')


@pytest.mark.parametrize('shape', [(2, 3, 8), (1, 5, 4, 8)])
def test_a_pooled_norm_is_the_norm(shape):
  norm = torch_model.RMSNorm(8, 1e-6)
  norm.weight.data = torch.randn(8)
  x = torch.randn(shape)
  np.testing.assert_allclose(device_model.PooledRMSNorm(norm)(x).detach().numpy(),
                             norm(x).detach().numpy(), rtol=1e-6, atol=1e-6)


def test_decoding_leaves_only_the_cache_ops_outside_xnnpack(tiny_model_config):
  """A decode step of the lowered program runs, per layer, ExecuTorch's two cache writes and
  its SDPA between XNNPACK partitions: RMSNorm's mean and RoPE's halves are delegated too."""
  from executorch.exir._serialize._program import deserialize_pte_binary
  config = tiny_model_config(meki=dict(enabled=False))
  device = device_model.build_device_model(torch_twin(moved_params(config), config),
                                           cache_len=CACHE_LEN)
  pte = to_device.lower_to_executorch(to_device.export_programs(device, CACHE_LEN))
  plan, = [plan for plan in deserialize_pte_binary(pte).program.execution_plan
           if plan.name == 'decode']
  calls = collections.Counter(
      'delegate' if type(instruction.instr_args).__name__ == 'DelegateCall' else
      plan.operators[instruction.instr_args.op_index].name
      for chain in plan.chains for instruction in chain.instructions
      if type(instruction.instr_args).__name__ in ('DelegateCall', 'KernelCall'))
  layers = config.num_layers
  assert calls['llama::update_cache'] == 2 * layers and calls['llama::custom_sdpa'] == layers
  assert not {'aten::mean', 'aten::split_with_sizes_copy'} & set(calls), calls
