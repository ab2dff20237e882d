"""The JAX side of the export: a training checkpoint -> folded tables + backbone + manifest.

`export_checkpoint` streams: it reads from the checkpoint only the parameters the export needs
(never the optimizer state), array by array and slice by slice (checkpoint_reader), folds M~
shard by shard with meki_jax.fold (a shard's rows for every layer: the fold's own chunk function
over that vocabulary slice, so the tables are bit-identical to `fold_params`' and never held
whole), writes them with memory_store, streams the backbone tensor by tensor, and publishes the
directory atomically. `export_folded` does the same from parameters already in memory
(`restore_params` restores them all with orbax). With several processes each folds and writes
its own vocabulary slice, and process 0 writes the rest and publishes. Parameters or folded rows
that are NaN or infinite fail the export, naming the array, layer and rows.
"""

import collections
import json
import uuid

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from tqdm import tqdm

from meki_jax import files, fold
from meki_jax.export import backbone, memory_store, table_quant
from meki_jax.export.checkpoint_reader import (CheckpointParams, TreeParams, checkpoint_step_dir,
                                               read_blocks, subtree, workdir_of)
from meki_jax.model.transformer import build_model, meki_enabled

MEMORY = ('layers', 'meki', 'memory')  # the fold's inputs below params/ ...
TABLE = MEMORY + ('memory_table',)  # ... of which M [num_layers, vocab, d_mem]
EMBEDDING = ('embed', 'embedding')  # E [vocab, d_model]
DEFAULT_READ_BYTES = 512 << 20  # the largest backbone read (whole chunks; one chunk if larger)


def restore_params(config, step_dir):
  """(unboxed training params as numpy, step) of a checkpoint step directory or a workdir.

  The whole parameter tree is restored with orbax onto this host's first CPU device, whatever
  mesh wrote it; the optimizer state is not (the target is the model's parameters only).
  `export_checkpoint` reads them array by array instead.
  """
  step_dir = checkpoint_step_dir(step_dir)
  cpu = jax.sharding.SingleDeviceSharding(jax.devices('cpu')[0])
  model = build_model(config.model)
  abstract = nn.meta.unbox(jax.eval_shape(
      lambda rng: model.init(rng, jnp.zeros((1, 1), jnp.int32))['params'],
      jax.random.PRNGKey(0)))
  target = {'params': abstract}
  restore_args = jax.tree_util.tree_map(
      lambda leaf: ocp.ArrayRestoreArgs(sharding=cpu, global_shape=leaf.shape, dtype=leaf.dtype),
      target)
  try:
    with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as checkpointer:
      restored = checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
          item=target, restore_args=restore_args, partial_restore=True))
  except (ValueError, KeyError, FileNotFoundError) as error:
    raise ValueError(f'checkpoint {step_dir} cannot be restored into this config\'s model: '
                     f'{error}') from error
  params = jax.tree_util.tree_map(np.asarray, restored['params'])
  return params, int(step_dir.name)


class NonFiniteError(ValueError):
  """A parameter or a folded row is NaN or infinite: such a model is not exported."""


def check_finite(values, what, row_start=0):
  """Fails naming `what` and the first bad rows (axis 0, numbered from row_start)."""
  bad = ~np.isfinite(values)
  if bad.any():
    rows = np.nonzero(bad.reshape(bad.shape[0], -1).any(axis=1))[0] + row_start
    raise NonFiniteError(f'{what}: rows {rows[:8].tolist()} ({rows.size} of them) hold NaN or '
                         'inf values; the checkpoint is damaged or diverged, refusing to export')


def memory_params(source):
  """The fold's small parameters (G, alpha, beta, mix norm) of every layer, layer-stacked,
  checked finite. The checkpoint's chunks span all layers, so they are read whole (MeKi-4B:
  1.0 GB in fp32)."""
  memory = subtree(source, MEMORY, skip=('memory_table',))
  for path, leaf in jax.tree_util.tree_flatten_with_path(memory)[0]:
    name = '/'.join(('params',) + MEMORY + tuple(key.key for key in path))
    check_finite(leaf, f'{name} (axis 0: layers)')
  return memory


def fold_shard(source, model_config, start, stop, memory=None):
  """M~ rows [start, stop) of every layer: [stop - start, num_layers, d_mem] float32.

  source: CheckpointParams or TreeParams; memory: `memory_params(source)` (read if None).
  Only rows [start, stop) of M and E are read. The fold's chunk function runs on the vocabulary
  slice as if it were the whole vocabulary. Non-finite inputs or rows fail naming layer and rows.
  """
  memory = memory_params(source) if memory is None else memory
  embed_chunk = source.read(EMBEDDING, slice(start, stop))  # [rows, d_model]
  check_finite(embed_chunk, 'params/embed/embedding', start)
  table = (source.read(TABLE, (slice(None), slice(start, stop))) if TABLE in source.paths
           else None)  # [num_layers, rows, d_mem]
  slice_config = ml_collections.ConfigDict(model_config.to_dict())
  slice_config.vocab_size = stop - start
  rows = np.empty((stop - start, model_config.num_layers, model_config.meki.d_mem), np.float32)
  for layer in range(model_config.num_layers):
    layer_params = fold.layer_slice(memory, layer)
    if table is not None:
      check_finite(table[layer], f'params/{"/".join(TABLE)} layer {layer}', start)
      layer_params['memory_table'] = table[layer]
    (_, layer_rows), = fold.iter_folded_layer(layer_params, embed_chunk, slice_config,
                                              stop - start)
    rows[:, layer] = np.asarray(layer_rows)
    check_finite(rows[:, layer], f'folded M~ of layer {layer}', start)
  return rows


def write_backbone(source, path, config_dict, dtype, read_bytes=DEFAULT_READ_BYTES):
  """Streams the backbone from `source` into `path` (backbone.StreamingWriter).

  Every leaf is read in blocks of whole stored chunks (checkpoint_reader.read_blocks, at most
  `read_bytes` unless one chunk is larger): a checkpoint's chunks are the training mesh's shards
  and span all layers (MeKi-4B on 8 devices: an MLP kernel [36, 2560, 9728] in chunks of
  [36, 320, 9728], 428 MiB), so each chunk is decoded once and only one block is in memory.
  Each layer's part of a block is checked finite and written into its tensor, in the file's
  layout, with `put_block` (for a transposed kernel, a block of its columns).
  """
  writer = backbone.StreamingWriter(path, config_dict, dtype)
  leaves = collections.defaultdict(dict)
  for name, leaf_path, layer, transform in backbone.tensor_sources(config_dict):
    leaves[leaf_path][layer] = (name, transform)
  try:
    for leaf_path, by_layer in tqdm(leaves.items(), desc='backbone', unit='array'):
      shape = source.shape(leaf_path)
      what = 'params/' + '/'.join(leaf_path)
      for index in read_blocks(shape, source.chunks(leaf_path), read_bytes):
        block = source.read(leaf_path, index)
        if None in by_layer:  # not layer-stacked (the embedding, the final norm)
          (name, transform), = by_layer.values()
          check_finite(block if block.ndim > 1 else block[None], what,
                       index[0].start if block.ndim > 1 else 0)
          writer.put_block(name, block, index, transform.view, shape)
        else:
          layers = range(*index[0].indices(shape[0]))
          for offset, layer in enumerate(layers):
            name, transform = by_layer[layer]
            check_finite(block[offset][None], f'{what} layer {layer}')
            writer.put_block(name, block[offset], index[1:], transform.view, shape[1:])
        del block  # not alive during the next read
    writer.finish()
  except BaseException:
    writer.abort()
    raise


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


def export_checkpoint(step_dir, model_config, out, **kwargs):
  """Writes the export directory `out` from a checkpoint step directory (or a workdir's latest),
  reading only the parameters the export needs, array by array (never the optimizer state).

  Peak memory: the fold's small parameters of all layers, one vocabulary shard of M, E and M~,
  and one backbone read (`read_bytes`, or one stored chunk if larger). kwargs: those of
  `export_folded`, plus `read_bytes`; `source` defaults to {'checkpoint', 'step'} of the step
  directory, `sources` (what `out` must stay clear of, files.check_output) to its workdir.
  """
  kwargs.setdefault('sources', (workdir_of(step_dir),))
  files.check_output(out, memory_store.EXPORT, overwrite=kwargs.get('overwrite', False),
                     sources=kwargs['sources'])  # before the checkpoint is verified and read
  params = CheckpointParams(step_dir)
  kwargs.setdefault('source', {'checkpoint': str(params.step_dir), 'step': params.step})
  return _export(params, model_config, out, **kwargs)


def export_folded(params, model_config, out, **kwargs):
  """Writes the export directory `out` from training params (unboxed numpy, scanned layout).

  dtype: the tables' storage scheme (export/table_quant.py: float32 | bfloat16 | float16 |
  int8 | int4, int4 in groups of `table_group_size` values); backbone_dtype: the safetensors'.
  source: {'checkpoint', 'step'}; vocabulary: see `vocabulary_record` (default: size only).
  overwrite: replace an existing export at `out`; sources: the directories the caller read,
  which `out` must be clear of (files.check_output).
  With process_count > 1 every process calls this with the same `run_id` and its own
  process_index; process 0 returns after the last one has written its slice.
  Returns the manifest (process 0) or None.
  """
  return _export(TreeParams(params), model_config, out, **kwargs)


def _export(params, model_config, out, *, dtype='float16', table_group_size=32,
            backbone_dtype='float32', rows_per_shard=fold.DEFAULT_CHUNK_ROWS, source=None,
            vocabulary=None, overwrite=False, sources=(), process_index=0, process_count=1, run_id=None,
            timeout_seconds=24 * 3600, read_bytes=DEFAULT_READ_BYTES):
  for baseline in ('ple', 'engram'):
    if baseline in model_config and model_config[baseline].enabled:
      raise ValueError(f'model.{baseline}.enabled: the device graph (export/torch_model.py) has '
                       f'no {baseline} branch, so this model cannot be exported')
  scheme = table_quant.TableScheme(dtype, table_group_size if dtype == 'int4' else 0)
  if meki_enabled(model_config):
    scheme.check_width(model_config.meki.d_mem)
  if backbone_dtype not in table_quant.FLOAT_SCHEMES:
    raise ValueError(f'backbone_dtype={backbone_dtype!r} is not one of '
                     f'{table_quant.FLOAT_SCHEMES}')
  if process_count > 1 and not run_id:
    raise ValueError('process_count > 1 needs a run_id shared by all processes of the export')
  run_id = run_id or uuid.uuid4().hex
  config_dict = json.loads(json.dumps(model_config.to_dict()))  # as manifest.json reads back
  with files.replacing(out, memory_store.EXPORT, overwrite=overwrite, sources=sources,
                       shared=process_count > 1, publish=process_index == 0) as temporary:
    backbone_path = temporary / memory_store.BACKBONE
    if process_index == 0:  # before the fold, whose freed heap the process may keep
      write_backbone(params, backbone_path, config_dict, backbone_dtype, read_bytes)

    memory_entry = None
    if meki_enabled(model_config):
      shape = (model_config.vocab_size, model_config.num_layers, model_config.meki.d_mem)
      writer = memory_store.TableWriter(temporary, shape, scheme, rows_per_shard)
      memory = memory_params(params)
      shards = memory_store.process_shards(len(writer.ranges), process_index, process_count)
      for index in tqdm(shards, desc=f'fold M~ ({model_config.num_layers} layers)',
                        unit='shard'):
        writer.write_shard(index, fold_shard(params, model_config, *writer.ranges[index], memory))
      del memory
      memory_store.write_part(temporary, run_id, process_index, process_count, writer.finish())
      if process_index == 0:
        records = memory_store.collect_parts(temporary, run_id, process_count, timeout_seconds)
        memory_entry = memory_store.memory_manifest(shape, scheme, rows_per_shard, records)
    if process_index != 0:
      return None

    manifest = {
        'format': memory_store.FORMAT, 'version': memory_store.FORMAT_VERSION,
        'model_config': config_dict,
        'source': source or {},
        'vocabulary': vocabulary or {'size': model_config.vocab_size},
        'memory': memory_entry,
        'backbone': {'file': memory_store.BACKBONE, 'dtype': backbone_dtype,
                     **memory_store.file_record(backbone_path)},
    }
    memory_store.remove_parts(temporary)
    memory_store.write_manifest(temporary, manifest)
  return manifest
