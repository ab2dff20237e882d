"""Text from a trained checkpoint: restore, fold, decode with a KV cache, print.

  python -m meki_jax.generate --workdir=runs/quickstart \
      --prompt="def parse_args(" [--prompt=...] [--max_new_tokens=64] [--temperature=0.8
      --top_k=50 --top_p=0.95] [--form=training] [--host_memory=tables.npy]

`--checkpoint=runs/quickstart/checkpoints/150` names one step instead of the latest in --workdir.
The run's config comes from <workdir>/config.json (the trainer writes it); --config overrides.
The folded (inference) form is the default; `--form=training` decodes the unfolded model, and
`--host_memory=PATH.npy` writes the folded tables there and decodes with them on the host.
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

import os  # noqa: E402
import pathlib  # noqa: E402
import sys  # noqa: E402

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax import decode, fold, host_memory, run_config  # noqa: E402
from meki_jax.config import validate  # noqa: E402
from meki_jax.data.tokenizer import load_tokenizer  # noqa: E402
from meki_jax.model.transformer import build_model, meki_enabled  # noqa: E402
from meki_jax.sharding import MESH_AXES, axis_rules  # noqa: E402
from meki_jax.train import checkpoint, optim, state as state_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run\'s config (configs/*.py[:arg]); '
                                          'default: <workdir>/config.json.', lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'A training workdir; its latest checkpoint.')
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A step directory <workdir>/checkpoints/N.')
_PROMPT = flags.DEFINE_multi_string('prompt', None, 'Prompt text; repeat for a batch.')
_MAX_NEW_TOKENS = flags.DEFINE_integer('max_new_tokens', 64, 'Tokens generated per prompt.')
_CACHE_LEN = flags.DEFINE_integer('cache_len', None, 'KV cache slots; default: the longest '
                                  'prompt plus max_new_tokens.')
_TEMPERATURE = flags.DEFINE_float('temperature', 0.0, '0: greedy.')
_TOP_K = flags.DEFINE_integer('top_k', 0, '0: off.')
_TOP_P = flags.DEFINE_float('top_p', 1.0, '1: off.')
_SEED = flags.DEFINE_integer('seed', 0, 'Sampling seed.')
_FORM = flags.DEFINE_enum('form', 'folded', ['folded', 'training'], 'Parameters to decode with.')
_HOST_MEMORY = flags.DEFINE_string('host_memory', None, 'Write the folded tables to this .npy '
                                   'file and read them from the host while decoding.')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --host_memory file.')


def checkpoint_location(workdir=None, checkpoint_path=None):
  """(workdir, step or None for the latest) from --workdir or a step directory."""
  if (workdir is None) == (checkpoint_path is None):
    raise ValueError('pass exactly one of --workdir (latest checkpoint) and --checkpoint '
                     '(<workdir>/checkpoints/<step>)')
  if checkpoint_path is None:
    if not os.path.isdir(workdir):
      raise FileNotFoundError(f'--workdir={workdir} does not exist')
    return workdir, None
  path = pathlib.Path(checkpoint_path).resolve()
  if not (path.name.isdigit() and path.parent.name == 'checkpoints' and path.is_dir()):
    raise ValueError(f'--checkpoint={checkpoint_path} is not a <workdir>/checkpoints/<step> '
                     'directory')
  return str(path.parent.parent), int(path.name)


def load_params(config, workdir, step=None):
  """The training-form parameters (unboxed) of a run's checkpoint, on one device."""
  if not os.path.isdir(os.path.join(workdir, 'checkpoints')):
    raise FileNotFoundError(f'{workdir} has no checkpoints/ directory: train with '
                            f'python -m meki_jax.train --workdir={workdir} first')
  model = build_model(config.model)
  optimizer = optim.make_optimizer(config.optim, config.train.num_steps,
                                   config.model.get('flavor', 'paper'))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh, axis_rules(config.mesh))
  manager = checkpoint.checkpoint_manager(workdir, config.train)
  try:
    state, _ = checkpoint.restore(manager, abstract, shardings, None, step)
  finally:
    manager.close()
  if state is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/checkpoints')
  return nn.meta.unbox(state.params)


def inference_model(params, model_config, form, host_memory_path=None, overwrite=False,
                    sources=()):
  """(DecodeTransformer, its params, HostMemory or None) for training params in `form`; the
  host-memory table is written as host_memory.write_host_memory does."""
  if form == 'training' or not meki_enabled(model_config):
    if host_memory_path:
      raise ValueError('--host_memory needs --form=folded and a MeKi model')
    return build_model(model_config, decode=True), decode.decode_params(params, model_config), None
  folded = fold.fold_params(params, model_config)
  memory = None
  if host_memory_path:
    folded, tables = host_memory.split_folded_tables(folded)
    memory = host_memory.write_host_memory(tables, host_memory_path, overwrite, sources)
  return (build_model(model_config, folded=True, decode=True),
          decode.decode_params(folded, model_config), memory)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  if not _PROMPT.value:
    raise app.UsageError('pass at least one --prompt')
  sampling = decode.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
  workdir, step = checkpoint_location(_WORKDIR.value, _CHECKPOINT.value)
  if _HOST_MEMORY.value:
    host_memory.check_path(_HOST_MEMORY.value, _OVERWRITE.value, sources=(workdir,))
  config = validate(_CONFIG.value or run_config.load(workdir))
  tokenizer = load_tokenizer(config.data.tokenizer)
  prompts = [tokenizer.encode(text) for text in _PROMPT.value]
  decode.check_prompts(prompts, config.model.vocab_size, _CACHE_LEN.value or sys.maxsize,
                       _MAX_NEW_TOKENS.value)  # all of the above before the restore
  params = load_params(config, workdir, step)
  model, params, memory = inference_model(params, config.model, _FORM.value, _HOST_MEMORY.value,
                                          _OVERWRITE.value, sources=(workdir,))
  outputs = decode.generate(model, params, prompts, max_new_tokens=_MAX_NEW_TOKENS.value,
                            eod_id=config.data.eod_id, cache_len=_CACHE_LEN.value,
                            sampling=sampling, seed=_SEED.value, memory=memory,
                            progress=True)
  for text, new_ids in zip(_PROMPT.value, outputs):
    print(text + tokenizer.decode(new_ids), flush=True)
  if memory is not None:
    memory.close()


if __name__ == '__main__':
  cli.run_absl(main)
