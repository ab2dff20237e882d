#!/usr/bin/env bash
# Runs a multi-process training job on this machine: NUM_PROCESSES processes on 127.0.0.1, each
# with DEVICES_PER_PROCESS virtual CPU devices, joined by jax.distributed (the same code path as
# a TPU pod's workers). Logs go to $MEKI_LOG_DIR/process_<i>.log (default: the current dir).
#
#   launch/local_multiprocess.sh 2 4 -- --config=configs/quickstart.py --workdir=runs/mp
#
# Exits non-zero if any process fails.
set -euo pipefail
if [ $# -lt 3 ] || [ "$3" != "--" ]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- TRAIN_ARGS..." >&2
  exit 2
fi
num_processes=$1
devices_per_process=$2
shift 3
port=${MEKI_PORT:-$(python -c 'import portpicker; print(portpicker.pick_unused_port())')}
log_dir=${MEKI_LOG_DIR:-.}
mkdir -p "$log_dir"

pids=()
for ((i = 0; i < num_processes; i++)); do
  JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$devices_per_process" \
    python -m meki_jax.train --coordinator_address="127.0.0.1:$port" \
      --num_processes="$num_processes" --process_id="$i" "$@" \
      >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit $status
