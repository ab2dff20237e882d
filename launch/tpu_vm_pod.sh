#!/usr/bin/env bash
# A Cloud TPU VM slice (e.g. v5p-64 = 8 hosts x 4 chips): create it, install meki-jax on every
# worker, run the trainer on all workers at once, tear it down.
#
#   export PROJECT=my-project ZONE=us-east5-a TPU_NAME=meki-v5p-64 ACCELERATOR=v5p-64
#   export BUCKET=my-bucket                       # checkpoints, metrics, config.json, shards
#   export REPO_URL=https://github.com/<you>/meki-jax.git REPO_REF=main
#   launch/tpu_vm_pod.sh create                   # queued resource; waits until ACTIVE
#   launch/tpu_vm_pod.sh setup                    # clone + pip install
#   launch/tpu_vm_pod.sh train --config=configs/meki_1p7b.py --workdir=gs://$BUCKET/runs/meki_1p7b \
#       --config.data.train_sources='({"path": "gs://'$BUCKET'/shards/fineweb/*.array_record", "weight": 1.0},)'
#   launch/tpu_vm_pod.sh logs                     # worker 0's log
#   launch/tpu_vm_pod.sh delete
#
# The workdir is a gs:// URL every worker writes to directly (README "Cloud Storage"): orbax
# writes each host's shards of a checkpoint there and process 0 writes metrics.jsonl,
# config.json and the lock object, with the TPU VM's service account as the credentials; the
# token shards are read from the bucket too (ArrayRecord's reader opens gs:// URLs). GCSFUSE=1 at
# `setup` also mounts $BUCKET with gcsfuse at /gcs, for paths under /gcs instead (not needed for
# gs:// URLs). jax.distributed finds the coordinator from the TPU VM's metadata
# (TPU_WORKER_HOSTNAMES), so no address is passed. A preempted slice sends SIGTERM: the trainer
# saves and exits 0; `train` again resumes from the latest checkpoint.
set -euo pipefail
: "${PROJECT:?set PROJECT}" "${ZONE:?set ZONE}" "${TPU_NAME:?set TPU_NAME}"
ACCELERATOR=${ACCELERATOR:-v5p-64}
REPO_REF=${REPO_REF:-main}
case "$ACCELERATOR" in  # the TPU VM software image per generation
  v5p-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5} ;;
  v5litepod-*|v5e-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv5-lite} ;;
  v6e-*) RUNTIME=${RUNTIME:-v2-alpha-tpuv6e} ;;
  v4-*) RUNTIME=${RUNTIME:-tpu-ubuntu2204-base} ;;
  *) echo "unknown ACCELERATOR=$ACCELERATOR (v4-N, v5p-N, v5e-N, v6e-N)" >&2; exit 2 ;;
esac
gcloud_tpu=(gcloud compute tpus tpu-vm --project="$PROJECT" --zone="$ZONE")
on_all_workers() { "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=all --command="$1"; }

command=${1:-}
shift || true
case "$command" in
  create)
    gcloud compute tpus queued-resources create "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --node-id="$TPU_NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$RUNTIME" \
      ${SPOT:+--spot}
    until gcloud compute tpus queued-resources describe "$TPU_NAME" --project="$PROJECT" \
        --zone="$ZONE" --format='value(state.state)' | grep -qx ACTIVE; do sleep 30; done
    ;;
  setup)
    : "${REPO_URL:?set REPO_URL (the git URL of your meki-jax)}"
    mount=""
    if [ "${GCSFUSE:-0}" = 1 ]; then
      : "${BUCKET:?set BUCKET (GCSFUSE=1 mounts it at /gcs)}"
      mount="sudo mkdir -p /gcs && sudo chown \$USER /gcs
      mountpoint -q /gcs || gcsfuse --implicit-dirs $BUCKET /gcs"
    fi
    on_all_workers "set -e
      $mount
      [ -d meki-jax ] || git clone $REPO_URL meki-jax
      cd meki-jax && git fetch -q && git checkout -q $REPO_REF
      python3 -m pip install -q -e '.[tpu,gcs]'"
    ;;
  train)
    # nohup: the run survives the ssh session; each worker logs to ~/meki-train.log.
    args=$(printf ' %q' "$@")
    on_all_workers "cd meki-jax && nohup python3 -m meki_jax.train$args > ~/meki-train.log 2>&1 &"
    ;;
  logs)
    "${gcloud_tpu[@]}" ssh "$TPU_NAME" --worker=0 --command='tail -n 50 ~/meki-train.log'
    ;;
  delete)
    gcloud compute tpus queued-resources delete "$TPU_NAME" --project="$PROJECT" --zone="$ZONE" \
      --force --quiet
    ;;
  *)
    echo "usage: $0 create|setup|train TRAIN_ARGS...|logs|delete" >&2
    exit 2
    ;;
esac
