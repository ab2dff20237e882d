"""The PyTorch graph equals the JAX folded model for every MeKi variant and the dense case."""

import itertools

import jax
import numpy as np
import pytest
import torch

from meki_jax.export.backbone import backbone_tensors
from meki_jax.export.exporter import ram_params
from meki_jax.export.torch_model import MekiForCausalLM
from meki_jax.fold import fold_params
from meki_jax.model.meki import FUSIONS, MEMORIES, POSITIONS, PROJECTIONS
from meki_jax.model.transformer import build_model
from tests.export.conftest import moved_params

# Default run: every position, fusion, memory and projection at least once, and the dense twin;
# the slow run adds every memory x position pair.
FAST_VARIANTS = [
    dict(memory='both', position='parallel_ffn', fusion='add_sigmoid', projection='swiglu'),
    dict(memory='static', position='parallel_attention', fusion='mul_sigmoid',
         projection='linear'),
    dict(memory='dynamic', position='after_attention', fusion='add_silu', projection='swiglu'),
    dict(memory='both', position='after_ffn', fusion='mul_silu', projection='linear'),
    dict(enabled=False),
]
VARIANTS = FAST_VARIANTS + [
    pytest.param(variant, marks=pytest.mark.slow) for variant in (
        dict(memory=memory, position=position, fusion=fusion, projection=projection)
        for (memory, position), fusion, projection in zip(
            itertools.product(MEMORIES, POSITIONS), itertools.cycle(FUSIONS),
            itertools.cycle(PROJECTIONS)))
    if variant not in FAST_VARIANTS]
# fp32 on both sides; the two differ only in summation order, ~1e-6 on logits of magnitude ~5.
TOLERANCE = 1e-4


def torch_twin(params, config):
  """MekiForCausalLM holding the folded `params` (a numpy tree)."""
  model = MekiForCausalLM(config.to_dict())
  tensors = backbone_tensors(ram_params(params), config.to_dict())
  model.load_state_dict({name: torch.from_numpy(np.array(value, np.float32))
                         for name, value in tensors.items()}, strict=True)
  return model.eval().requires_grad_(False)


@pytest.mark.parametrize('variant', VARIANTS, ids=lambda v: '-'.join(map(str, v.values())))
def test_prefill_then_decode_equals_the_jax_folded_model(tiny_model_config, variant):
  _check_prefill_then_decode(tiny_model_config(meki=variant))


@pytest.mark.parametrize('variant', [FAST_VARIANTS[0], dict(enabled=False)],
                         ids=['meki', 'dense'])
def test_authors_release_flavor_equals_the_jax_folded_model(tiny_model_config, variant):
  """spec 6a: the graph's MeKi gate reads the raw residual, as the JAX model's does."""
  _check_prefill_then_decode(tiny_model_config(meki=variant, flavor='authors_release',
                                               qk_norm=False))


def _check_prefill_then_decode(config):
  token_ids = np.random.default_rng(2).integers(0, config.vocab_size, (2, 9))
  params = moved_params(config)
  folded = jax.tree_util.tree_map(np.asarray, fold_params(params, config))
  expected = np.asarray(build_model(config, folded=True).apply({'params': folded}, token_ids))

  model = torch_twin(folded, config)
  ids = torch.from_numpy(np.asarray(token_ids, np.int64))
  tables = folded['layers'].get('meki', {}).get('folded_memory')  # [L, V, m]
  rows = lambda ids: (() if tables is None else (torch.from_numpy(
      np.moveaxis(tables[:, ids.numpy()], 0, 2).copy()),))  # [b, t, L, m]
  key_cache, value_cache = model.empty_cache(batch=2, cache_len=12)
  prefill = 5  # tokens 0..4 at once, then one at a time: every position's logits are compared
  logits, key_cache, value_cache = model(ids[:, :prefill], torch.arange(prefill), key_cache,
                                         value_cache, *rows(ids[:, :prefill]))
  steps = [logits]
  for position in range(prefill, ids.shape[1]):
    logits, key_cache, value_cache = model(ids[:, position:position + 1],
                                           torch.tensor([position]), key_cache, value_cache,
                                           *rows(ids[:, position:position + 1]))
    steps.append(logits)
  np.testing.assert_allclose(torch.cat(steps, dim=1).numpy(), expected, rtol=0, atol=TOLERANCE)


def test_memory_rows_are_required_exactly_for_meki(tiny_model_config):
  model = MekiForCausalLM(tiny_model_config().to_dict())
  cache = model.empty_cache(1, 4)
  with pytest.raises(ValueError, match='memory_rows are required'):
    model(torch.zeros((1, 2), dtype=torch.int64), torch.arange(2), *cache)
