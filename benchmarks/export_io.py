"""Export I/O: tensorstore shard writes and per-token row gathers against the raw disk.

  python benchmarks/export_io.py [--config configs/meki_1p7b.py] [--dtype float16|int8|int4]
      [--rows 151680] [--repeats 3] [--gathers 2000] [--cache_mb 16] [--dir /tmp]

Writes M~ for `--rows` tokens ([rows, num_layers, d_mem], random values stored under the table
scheme `--dtype`, export/table_quant.py; the fold is not timed)
twice in the same run: as plain files of the same shard sizes with write + fsync (the raw disk
baseline) and through memory_store.TableWriter (zarr3 shards, tensorstore, fsync on commit). Then
times reading all layers of one token: os.pread of the same bytes from the raw files (the
baseline), tensorstore, and FoldedMemory.rows (pread + crc32c, export/shard_reader.py),
each first with the files evicted from the page cache (cold), then the same tokens again
(warm). Targets (issue 5): writes >= 50% of the raw throughput, warm p99
gather < 1 ms.
"""

import argparse
import os
import pathlib
import shutil
import tempfile
import time

import numpy as np

from meki_jax.export import memory_store, table_quant


def _load_model_config(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('benchmark_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config().model


def raw_write(directory, shard_bytes, shard_rows):
  """Writes each shard as one file with write + fsync; returns seconds."""
  directory.mkdir()
  start = time.perf_counter()
  for index, rows in enumerate(shard_rows):
    fd = os.open(directory / f'{index}', os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
      os.write(fd, shard_bytes[:rows])
      os.fsync(fd)
    finally:
      os.close(fd)
  return time.perf_counter() - start


def drop_from_page_cache(paths):
  """Evicts the files' (clean, fsynced) pages, so the next reads come from the disk."""
  for path in paths:
    fd = os.open(path, os.O_RDONLY)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
      os.close(fd)


def percentiles(seconds):
  micro = np.asarray(seconds) * 1e6
  return np.percentile(micro, 50), np.percentile(micro, 99)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--config', default='configs/meki_1p7b.py')
  parser.add_argument('--dtype', default='float16', choices=list(table_quant.SCHEMES))
  parser.add_argument('--table_group_size', type=int, default=32, help='int4 values per scale')
  parser.add_argument('--rows', type=int, default=None, help='tokens to write (default: vocab)')
  parser.add_argument('--rows_per_shard', type=int, default=8192)
  parser.add_argument('--gathers', type=int, default=2000)
  parser.add_argument('--repeats', type=int, default=3, help='alternating write measurements')
  parser.add_argument('--dir', default=None, help='where to write (default: the temp dir)')
  parser.add_argument('--cache_mb', type=int, default=memory_store.DEFAULT_CACHE_BYTES >> 20,
                      help='the reader\'s tensorstore cache')
  args = parser.parse_args()

  model = _load_model_config(args.config)
  vocab = args.rows or model.vocab_size
  layers, d_mem = model.num_layers, model.meki.d_mem
  scheme = table_quant.TableScheme(args.dtype,
                                   args.table_group_size if args.dtype == 'int4' else 0)
  token_bytes = layers * scheme.stored_width(d_mem) * scheme.storage_dtype.itemsize
  ranges = memory_store.shard_ranges(vocab, args.rows_per_shard)
  shard = np.random.default_rng(0).standard_normal(
      (args.rows_per_shard, layers, d_mem), dtype=np.float32)
  raw_shard = scheme.encode(shard).tobytes()  # the same bytes, for the raw baseline
  total = vocab * token_bytes
  print(f'{args.config}: {vocab:,} tokens x {layers} layers x {d_mem} {args.dtype} = '
        f'{token_bytes:,} B per token, {total / 2**30:.2f} GiB in {len(ranges)} shards')

  work = pathlib.Path(tempfile.mkdtemp(prefix='export_io.', dir=args.dir))
  try:
    # The disk is shared and its speed drifts: raw and tensorstore writes alternate, and the
    # medians of `--repeats` runs are compared.
    raw_rates, write_rates, shard_sizes = [], [], [(stop - start) * token_bytes
                                                   for start, stop in ranges]
    for repeat in range(args.repeats):
      raw_seconds = raw_write(work / f'raw{repeat}', raw_shard, shard_sizes)
      raw_rates.append(total / raw_seconds)
      export_dir = work / f'export{repeat}'
      start = time.perf_counter()
      writer = memory_store.TableWriter(export_dir, (vocab, layers, d_mem), scheme,
                                        args.rows_per_shard)
      for index, (first, stop) in enumerate(ranges):
        writer.write_shard(index, shard[:stop - first])
      writer.flush()  # the writes alone; finish() adds the checksum pass, timed next
      write_seconds = time.perf_counter() - start
      start = time.perf_counter()
      records = writer.finish()
      checksum_seconds = time.perf_counter() - start
      written = sum(record['bytes'] for record in records.values())
      write_rates.append(written / write_seconds)
      if repeat < args.repeats - 1:
        shutil.rmtree(work / f'raw{repeat}')
        shutil.rmtree(export_dir)
    raw_rate, write_rate = np.median(raw_rates), np.median(write_rates)
    print(f'raw disk write (write + fsync)  {raw_rate / 1e6:8.1f} MB/s  (median of '
          f'{", ".join(f"{rate / 1e6:.0f}" for rate in raw_rates)})')
    print(f'tensorstore shard write         {write_rate / 1e6:8.1f} MB/s  (median of '
          f'{", ".join(f"{rate / 1e6:.0f}" for rate in write_rates)})  '
          f'= {write_rate / raw_rate:.2f} x raw   (target >= 0.50)')
    print(f'sha256 of the shards            {written / checksum_seconds / 1e6:8.1f} MB/s  '
          f'(last export: {write_seconds + checksum_seconds:.1f} s)')

    entry = memory_store.memory_manifest((vocab, layers, d_mem), scheme,
                                         args.rows_per_shard, records)
    config = {'vocab_size': vocab, 'num_layers': layers, 'meki': {'d_mem': d_mem}}
    memory = memory_store.FoldedMemory(export_dir, entry, config, args.cache_mb << 20)
    token_ids = np.random.default_rng(1).integers(0, vocab, args.gathers)
    raw_dir = work / f'raw{args.repeats - 1}'
    raw_files = [raw_dir / f'{index}' for index in range(len(ranges))]
    shard_files = [export_dir / record['file'] for record in records.values()]
    files = [os.open(path, os.O_RDONLY) for path in raw_files]
    readers = {
        'raw pread': (raw_files, lambda token: os.pread(
            files[int(token) // args.rows_per_shard], token_bytes,
            int(token) % args.rows_per_shard * token_bytes)),
        'tensorstore': (shard_files, lambda token: memory.store[int(token)].read().result()),
        'FoldedMemory.rows (pread)': (shard_files, lambda token: memory.rows(np.array([token]))),
    }
    try:
      for name, (paths, read) in readers.items():
        drop_from_page_cache(paths)
        for label in ('cold', 'warm'):  # cold: evicted from the page cache; warm: read again
          seconds = []
          for token in token_ids:
            begin = time.perf_counter()
            read(token)
            seconds.append(time.perf_counter() - begin)
          p50, p99 = percentiles(seconds)
          print(f'gather 1 token, all layers, {label:4s}: {name:25s} p50 {p50:5.0f} us  '
                f'p99 {p99:5.0f} us')
    finally:
      for fd in files:
        os.close(fd)
    print(f'warm p99 of FoldedMemory.rows, target < 1000 us: {"met" if p99 < 1000 else "missed"}; '
          f'write target: {"met" if write_rate >= 0.5 * raw_rate else "missed"}')
  finally:
    shutil.rmtree(work)


if __name__ == '__main__':
  main()
