"""The JAX side of the export: a training checkpoint -> folded tables + backbone + manifest.

`restore_params` reads only the parameters of a checkpoint, written on any mesh, onto
this host's CPU. `export_folded` folds M~ shard by shard with meki_jax.fold (a shard's rows for
every layer: the fold's own chunk function over that vocabulary slice, so the tables are
bit-identical to `fold_params`' and never held whole), writes them with memory_store, writes the
backbone, and publishes the directory atomically. With several processes each folds and writes
its own vocabulary slice, and process 0 writes the rest and publishes.
"""

import json
import pathlib
import uuid

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from meki_jax import fold
from meki_jax.export import backbone, memory_store
from meki_jax.model.transformer import build_model, meki_enabled
from meki_jax.sharding import MESH_AXES, axis_rules
from meki_jax.train import optim, state as state_lib


def checkpoint_step_dir(path):
  """A step directory: `path` itself (<workdir>/checkpoints/<step>) or a workdir's latest."""
  path = pathlib.Path(path).absolute()
  if path.name.isdigit() and (path / 'state').is_dir():
    return path
  steps = sorted((int(p.name) for p in (path / 'checkpoints').glob('*')
                  if p.name.isdigit() and (p / 'state').is_dir()), reverse=True)
  if not steps:
    raise FileNotFoundError(f'{path} is neither a checkpoint step directory '
                            '(<workdir>/checkpoints/<step>) nor a workdir with checkpoints')
  return path / 'checkpoints' / str(steps[0])


def restore_params(config, step_dir):
  """(unboxed training params as numpy, step) of a checkpoint step directory or a workdir.

  Only the parameters are read (the optimizer state, twice their size, is skipped); they land
  on this host's first CPU device whatever mesh wrote them.
  """
  step_dir = checkpoint_step_dir(step_dir)
  cpu = jax.devices('cpu')[0]
  mesh = jax.sharding.Mesh(np.array([cpu]).reshape((1,) * len(MESH_AXES)), MESH_AXES)
  abstract, shardings = state_lib.state_shardings(
      build_model(config.model),
      optim.make_optimizer(config.optim, config.train.num_steps,
                           config.model.get('flavor', 'paper')), mesh, axis_rules(config.mesh))
  target, target_shardings = {'params': abstract.params}, {'params': shardings.params}
  restore_args = jax.tree_util.tree_map(
      lambda leaf, sharding: ocp.ArrayRestoreArgs(sharding=sharding, global_shape=leaf.shape,
                                                  dtype=leaf.dtype), target, target_shardings)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as error:
    raise ValueError(f'checkpoint {step_dir} cannot be restored into this config\'s model: '
                     f'{error}') from error
  params = jax.tree_util.tree_map(np.asarray, nn.meta.unbox(restored['params']))
  return params, int(step_dir.name)


def _layer_memory(memory, layer, start, stop):
  """One layer's memory parameters with M cut to vocabulary rows [start, stop)."""
  params = fold.layer_slice(memory, layer)
  if 'memory_table' in params:
    params = {**params, 'memory_table': memory['memory_table'][layer, start:stop]}
  return params


def fold_shard(params, model_config, start, stop):
  """M~ rows [start, stop) of every layer: [stop - start, num_layers, d_mem] float32.

  The fold's chunk function runs on the vocabulary slice as if it were the whole vocabulary,
  so only the slice's rows of M and E are handed over.
  """
  memory = params['layers']['meki']['memory']
  embed_chunk = params['embed']['embedding'][start:stop]  # [rows, d_model]
  slice_config = ml_collections.ConfigDict(model_config.to_dict())
  slice_config.vocab_size = stop - start
  rows = np.empty((stop - start, model_config.num_layers, model_config.meki.d_mem), np.float32)
  for layer in range(model_config.num_layers):
    (_, layer_rows), = fold.iter_folded_layer(_layer_memory(memory, layer, start, stop),
                                              embed_chunk, slice_config, stop - start)
    rows[:, layer] = np.asarray(layer_rows)
  return rows


def ram_params(params):
  """The parameters a folded model keeps in RAM: everything but the memory (M, G, alpha, ...)."""
  layers = params['layers']
  if 'meki' not in layers:
    return params
  meki = {key: value for key, value in layers['meki'].items()
          if key not in ('memory', 'folded_memory')}
  return {**params, 'layers': {**layers, 'meki': meki}}


def vocabulary_record(data_config, vocab_size):
  """The manifest's vocabulary: tokenizer, padded size, ids in use, end-of-document id."""
  from meki_jax.data.tokenizer import load_tokenizer  # tiktoken; only the tool needs it
  tokenizer = load_tokenizer(data_config.tokenizer)
  if tokenizer.vocab_size > vocab_size:
    raise ValueError(f'data.tokenizer={data_config.tokenizer!r} uses {tokenizer.vocab_size} ids, '
                     f'more than model.vocab_size={vocab_size}')
  return {'size': vocab_size, 'tokenizer': data_config.tokenizer,
          'tokens_in_use': tokenizer.vocab_size, 'eod_id': int(data_config.eod_id)}


def export_folded(params, model_config, out, *, dtype='float16', backbone_dtype='float32',
                  rows_per_shard=fold.DEFAULT_CHUNK_ROWS, source=None, vocabulary=None,
                  overwrite=False, process_index=0, process_count=1, run_id=None,
                  timeout_seconds=24 * 3600):
  """Writes the export directory `out` from training params (unboxed numpy, scanned layout).

  dtype: the tables' (float32 | bfloat16 | float16); backbone_dtype: the safetensors'.
  source: {'checkpoint', 'step'}; vocabulary: see `vocabulary_record` (default: size only).
  With process_count > 1 every process calls this with the same `run_id` and its own
  process_index; process 0 returns after the last one has written its slice.
  Returns the manifest (process 0) or None.
  """
  for baseline in ('ple', 'engram'):
    if baseline in model_config and model_config[baseline].enabled:
      raise ValueError(f'model.{baseline}.enabled: the device graph (export/torch_model.py) has '
                       f'no {baseline} branch, so this model cannot be exported')
  if dtype not in memory_store.DTYPES:
    raise ValueError(f'dtype={dtype!r} is not one of {tuple(memory_store.DTYPES)}')
  if process_count > 1 and not run_id:
    raise ValueError('process_count > 1 needs a run_id shared by all processes of the export')
  run_id = run_id or uuid.uuid4().hex
  config_dict = json.loads(json.dumps(model_config.to_dict()))  # as manifest.json reads back
  temporary = memory_store.prepare_output(out, overwrite, process_count)

  memory_entry = None
  if meki_enabled(model_config):
    shape = (model_config.vocab_size, model_config.num_layers, model_config.meki.d_mem)
    writer = memory_store.TableWriter(temporary, shape, dtype, rows_per_shard)
    for index in memory_store.process_shards(len(writer.ranges), process_index, process_count):
      writer.write_shard(index, fold_shard(params, model_config, *writer.ranges[index]))
    memory_store.write_part(temporary, run_id, process_index, process_count, writer.finish())
    if process_index == 0:
      records = memory_store.collect_parts(temporary, run_id, process_count, timeout_seconds)
      memory_entry = memory_store.memory_manifest(shape, dtype, rows_per_shard, records)
  if process_index != 0:
    return None

  backbone_path = temporary / memory_store.BACKBONE
  backbone.write_backbone(backbone_path, backbone.backbone_tensors(ram_params(params), config_dict),
                          config_dict, backbone_dtype)
  manifest = {
      'format': memory_store.FORMAT, 'version': memory_store.FORMAT_VERSION,
      'model_config': config_dict,
      'source': source or {},
      'vocabulary': vocabulary or {'size': model_config.vocab_size},
      'memory': memory_entry,
      'backbone': {'file': memory_store.BACKBONE, 'dtype': backbone_dtype,
                   **memory_store.file_record(backbone_path)},
  }
  memory_store.write_manifest(temporary, manifest)
  memory_store.publish(temporary, out, overwrite)
  return manifest
