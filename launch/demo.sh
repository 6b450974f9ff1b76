#!/usr/bin/env bash
# The end-to-end drift demo on the embedded fictional data: sets up .venv (with the test extra, so
# the exported policy can be reloaded with transformers/PyTorch) and runs `tracealign demo`.
# Finished stages are cached under runs/demo: a second run only prints the report again.
# Extra arguments go to `tracealign demo`, e.g. `./launch/demo.sh --set eval.sft_steps=500 --force`.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup_env.sh" "test,tpu-aot"  # same extras as test.sh: one shared .venv
cd "$root"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
exec tracealign demo --out runs/demo "$@"
