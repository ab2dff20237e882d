"""Generation from a training checkpoint: restore, fold (or not), decode, detokenize."""

import subprocess
import sys

import jax
import numpy as np
import pytest

from configs import base
from meki_jax import decode, generate, sharding
from meki_jax.data.tokenizer import load_tokenizer
from meki_jax.model.transformer import build_model
from meki_jax.train import checkpoint, optim, state as state_lib

CONFIG_FILE = '''
from configs import base

def get_config(arg=None):
  config = base.get_config()
  config.model = base.model_config(num_layers=1, d_model=32, num_heads=2, num_kv_heads=1,
                                   d_ff=64, d_mem=8)
  config.model.head_dim = 16
  config.model.dtype = 'float32'
  config.model.remat_policy = 'none'
  config.train.num_steps = 10
  return config
'''


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, saved params): a step-3 checkpoint written on the 8-device mesh."""
  workdir = tmp_path_factory.mktemp('run')
  (workdir / 'config.py').write_text(CONFIG_FILE)
  namespace = {}
  exec(CONFIG_FILE, namespace)  # noqa: S102  (the same config the CLI test loads from the file)
  config = namespace['get_config']()
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps)
  mesh = sharding.make_mesh(config.mesh)
  state = state_lib.create_state(model, optimizer, mesh, sharding.axis_rules(config.mesh),
                                 jax.random.PRNGKey(0))
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  checkpoint.save(manager, 3, state, None, force=True)
  manager.wait_until_finished()
  manager.close()
  return config, workdir, jax.device_get(state.params)


def test_restored_parameters_are_the_saved_ones(run):
  config, workdir, saved = run
  for restored in (generate.load_params(config, str(workdir)),
                   generate.load_params(config, *generate.checkpoint_location(
                       checkpoint_path=str(workdir / 'checkpoints' / '3')))):
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(restored), saved)


def test_every_form_generates_the_same_text(run, tmp_path):
  config, workdir, _ = run
  params = generate.load_params(config, str(workdir))
  tokenizer = load_tokenizer(config.data.tokenizer)
  prompts = [tokenizer.encode('def main('), tokenizer.encode('import os\n')]
  texts = []
  for form, host_path in (('training', None), ('folded', None),
                          ('folded', tmp_path / 'tables.npy')):
    model, decode_params, memory = generate.inference_model(params, config.model, form,
                                                            host_path)
    outputs = decode.generate(model, decode_params, prompts, max_new_tokens=5,
                              eod_id=config.data.eod_id, memory=memory)
    texts.append([tokenizer.decode(tokens) for tokens in outputs])
  assert texts[0] == texts[1] == texts[2]
  assert all(isinstance(text, str) and text for text in texts[0])


def test_checkpoint_location_is_checked(tmp_path):
  with pytest.raises(ValueError, match='exactly one of --workdir'):
    generate.checkpoint_location(None, None)
  with pytest.raises(ValueError, match='is not a <workdir>/checkpoints/<step> directory'):
    generate.checkpoint_location(checkpoint_path=str(tmp_path))
  with pytest.raises(FileNotFoundError, match='has no checkpoints/ directory'):
    generate.load_params(base.get_config(), str(tmp_path))


@pytest.mark.slow
def test_command_line_prints_the_prompt_and_its_continuation(run):
  _, workdir, _ = run
  result = subprocess.run(
      [sys.executable, '-m', 'meki_jax.generate', f'--config={workdir / "config.py"}',
       f'--workdir={workdir}', '--prompt=def main(', '--prompt=import os', '--max_new_tokens=4',
       '--temperature=0.7', '--top_k=40', '--top_p=0.9'],
      capture_output=True, text=True, check=False)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.split('\n')
  assert lines[0].startswith('def main(')
  assert any(line.startswith('import os') for line in lines[1:])
