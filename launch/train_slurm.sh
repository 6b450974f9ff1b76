#!/usr/bin/env bash
# Train on a SLURM GPU cluster, one process per node driving that node's GPUs (8 x H100 per node).
#   sbatch --nodes=2 launch/train_slurm.sh configs/qwen25_7b_8xh100.yaml [--set k=v ...]
# srun starts one task per node; jax.distributed.initialize() reads SLURM's variables (node list,
# task id) to find the coordinator and this process's id. For one process per GPU instead, submit
# with --ntasks-per-node=8 --gpus-per-task=1 (NUM_PROCESSES below follows SLURM_NTASKS).
# Paths in the config must be on a filesystem all nodes share.
#SBATCH --job-name=tracealign-train
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --exclusive
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: sbatch [--nodes=N] $0 CONFIG [--set k=v ...]" >&2; exit 2; }
root="${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}"
py="${PYTHON:-$root/.venv/bin/python}"
config="$1"; shift
ntasks="${SLURM_NTASKS:-1}"
srun --kill-on-bad-exit=1 "$py" -m tracealign_jax.cli train --config "$config" "$@" \
  --set "mesh.num_processes=$ntasks" --no-progress
