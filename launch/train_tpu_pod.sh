#!/usr/bin/env bash
# Train on a Cloud TPU pod slice: every worker runs the same command; jax.distributed.initialize()
# auto-detects the coordinator and process ids from the TPU metadata.
#   TPU_NAME=my-v5p-64 ZONE=us-east5-a NUM_WORKERS=8 launch/train_tpu_pod.sh CONFIG [--set k=v ...]
# Inputs: TPU_NAME, ZONE (gcloud), NUM_WORKERS (hosts in the slice: v5p-64 = 8), REPO_DIR (path of
# this repository on the workers, default ~/tracealign-jax, already set up with launch/setup_env.sh
# tpu). Data, tokenizer, BCI store and veto table paths in the config must be readable on every
# worker (a shared disk, or gs:// for the tensorstore stores); checkpoints go to train.output_dir
# (use a gs:// bucket or a shared filesystem so every worker writes the same checkpoint).
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: TPU_NAME=.. ZONE=.. NUM_WORKERS=.. $0 CONFIG [--set k=v ...]" >&2; exit 2; }
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${NUM_WORKERS:?set NUM_WORKERS}"
repo="${REPO_DIR:-~/tracealign-jax}"
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all --command \
  "cd $repo && .venv/bin/python -m tracealign_jax.cli train --config$args --set mesh.num_processes=$NUM_WORKERS --no-progress"
