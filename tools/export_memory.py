"""Exports a training checkpoint for inference: folded tables M~ (zarr3) + backbone + manifest.

  python tools/export_memory.py --checkpoint=runs/quickstart[/checkpoints/120] \
      --out=exports/quickstart [--config=configs/quickstart.py] [--dtype=float16|int8|int4]
      [--table_group_size=32] [--backbone_dtype=float32] [--rows_per_shard=8192] [--read_mb=512]
      [--overwrite]

--checkpoint is a step directory or a workdir (its latest step); the config defaults to the
workdir's config.json (written by the trainer). Only the parameters the export needs are read
from the checkpoint, array by array (never the optimizer state): MeKi-4B exports in under 8 GB
of RAM (README). --dtype is the tables' storage scheme: float32/float16/bfloat16 values, or int8
with a float16 scale per token and layer, or int4 with a float16 scale per --table_group_size
values (export/table_quant.py; the device programs dequantize). NaN or infinite parameters or
folded rows fail the export, naming them. A workdir's damaged newest steps are skipped, naming
them (the trainer's rule). An existing --out is left untouched unless --overwrite, which replaces
only a memory export, once the new one is complete, and never the checkpoint's workdir or a
directory inside or around it. On several hosts run it once per host with --process_index,
--process_count and one --run_id; each host folds and writes its own vocabulary slice and
process 0 publishes the export when all are done (--out must be on a shared file system).
"""

from meki_jax import cli

cli.start(__name__)  # before jax is imported: Ctrl-C is one line from here on

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from meki_jax import files, fold, run_config  # noqa: E402
from meki_jax.config import validate  # noqa: E402
from meki_jax.export import exporter, memory_store, table_quant  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file('config', None, 'The run\'s config (configs/*.py[:arg]); '
                                          'default: <workdir>/config.json.', lock_config=True)
_CHECKPOINT = flags.DEFINE_string('checkpoint', None, 'A step directory or a training workdir.')
_OUT = flags.DEFINE_string('out', None, 'The export directory to create.')
_DTYPE = flags.DEFINE_enum('dtype', 'float16', list(table_quant.SCHEMES),
                           'Table storage: a float dtype, or int8 / int4 quantized.')
_TABLE_GROUP_SIZE = flags.DEFINE_integer('table_group_size', 32,
                                         'Values per float16 scale of --dtype=int4 tables.')
_BACKBONE_DTYPE = flags.DEFINE_enum('backbone_dtype', 'float32', list(table_quant.FLOAT_SCHEMES),
                                    'Backbone (safetensors) dtype.')
_ROWS_PER_SHARD = flags.DEFINE_integer('rows_per_shard', fold.DEFAULT_CHUNK_ROWS,
                                       'Vocabulary rows per shard file (and per fold chunk).')
_READ_MB = flags.DEFINE_integer('read_mb', exporter.DEFAULT_READ_BYTES >> 20,
                                'The largest backbone read from the checkpoint, in MiB (whole '
                                'chunks; a larger chunk is read alone).')
_OVERWRITE = flags.DEFINE_bool('overwrite', False, 'Replace an existing --out.')
_PROCESS_INDEX = flags.DEFINE_integer('process_index', 0, 'This process (multi-host export).')
_PROCESS_COUNT = flags.DEFINE_integer('process_count', 1, 'Processes writing the export.')
_RUN_ID = flags.DEFINE_string('run_id', None, 'An id shared by the processes of one export.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
  workdir = exporter.workdir_of(_CHECKPOINT.value)
  files.check_output(_OUT.value, memory_store.EXPORT, overwrite=_OVERWRITE.value,
                     sources=(workdir,))  # before the checkpoint is verified
  step_dir = exporter.checkpoint_step_dir(_CHECKPOINT.value)
  config = validate(_CONFIG.value or run_config.load(workdir))
  step = int(step_dir.name)
  manifest = exporter.export_checkpoint(
      step_dir, config.model, _OUT.value, dtype=_DTYPE.value,
      table_group_size=_TABLE_GROUP_SIZE.value,
      backbone_dtype=_BACKBONE_DTYPE.value, rows_per_shard=_ROWS_PER_SHARD.value,
      overwrite=_OVERWRITE.value, sources=(workdir,), read_bytes=_READ_MB.value << 20,
      vocabulary=exporter.vocabulary_record(config.data, config.model.vocab_size),
      process_index=_PROCESS_INDEX.value, process_count=_PROCESS_COUNT.value,
      run_id=_RUN_ID.value)
  if manifest is not None:
    memory = manifest['memory']
    tables = 'no tables (dense model)' if memory is None else (
        f'tables {memory["shape"]} {memory["scheme"]["name"]} in {len(memory["shards"])} '
        'shards')
    print(f'{_OUT.value}: step {step}, {tables}, backbone {manifest["backbone"]["bytes"]:,} B')


if __name__ == '__main__':
  flags.mark_flags_as_required(['checkpoint', 'out'])
  cli.run_absl(main)
