#!/usr/bin/env bash
# Train on one host (all its local devices form the mesh): CPU, one GPU box, or a single TPU VM.
#   launch/train_single.sh CONFIG [--set key=value ...]
# e.g. launch/train_single.sh configs/tiny_cpu.yaml --set data.train_path=prefs.jsonl --set train.steps=50
# Re-running the same command resumes from the latest checkpoint in train.output_dir/checkpoints.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 1 ] || { echo "usage: $0 CONFIG [--set k=v ...]" >&2; exit 2; }
config="$1"; shift
py="${PYTHON:-$root/.venv/bin/python}"
exec "$py" -m tracealign_jax.cli train --config "$config" "$@"
