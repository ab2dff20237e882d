"""The learning-rate schedule and which parameters get weight decay."""

import numpy as np
import pytest

from configs import base
from meki_jax.train.optim import decay_mask, learning_rate_schedule


def test_schedule_warms_up_linearly_then_decays_to_the_floor():
  optim = base.get_config().optim  # peak 4e-4, floor 2e-4, 500 warm-up steps
  schedule = learning_rate_schedule(optim, num_steps=50_000)
  assert float(schedule(0)) == 0.0
  assert float(schedule(250)) == pytest.approx(2e-4)
  assert float(schedule(500)) == pytest.approx(4e-4)
  assert float(schedule(500 + 49_500 // 2)) == pytest.approx(3e-4, rel=1e-4)  # cosine midpoint
  assert float(schedule(50_000)) == pytest.approx(2e-4)
  assert float(schedule(60_000)) == pytest.approx(2e-4)


def test_norm_gains_and_meki_scalars_are_not_decayed():
  params = {'layers': {'mlp': {'gate': {'kernel': np.zeros((2, 3))}},
                       'pre_ffn_norm': {'scale': np.ones(3)},
                       'meki': {'memory': {'alpha': np.ones(2), 'beta': np.ones(2),
                                           'memory_table': np.zeros((2, 5, 4))}}},
            'embed': {'embedding': np.zeros((5, 3))}}
  mask = decay_mask(params)
  assert mask['layers']['mlp']['gate']['kernel'] and mask['embed']['embedding']
  assert mask['layers']['meki']['memory']['memory_table']
  assert not mask['layers']['pre_ffn_norm']['scale']
  assert not mask['layers']['meki']['memory']['alpha']
  assert not mask['layers']['meki']['memory']['beta']
