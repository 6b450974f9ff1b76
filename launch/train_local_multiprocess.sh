#!/usr/bin/env bash
# N JAX processes on THIS machine, each with D simulated CPU devices, talking over gloo: the way CI
# exercises multi-host code paths without a cluster.
#   launch/train_local_multiprocess.sh N D CONFIG [--set key=value ...]
# e.g. launch/train_local_multiprocess.sh 2 4 configs/tiny_cpu.yaml --set data.train_path=prefs.jsonl
# Process i gets --set mesh.coordinator=127.0.0.1:PORT mesh.num_processes=N mesh.process_id=i;
# logs go to $OUT_DIR/proc-i.log (OUT_DIR defaults to ./runs/multiprocess-logs). If one process
# fails the others are stopped.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
[ $# -ge 3 ] || { echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS CONFIG [--set k=v ...]" >&2; exit 2; }
n="$1"; d="$2"; config="$3"; shift 3
py="${PYTHON:-$root/.venv/bin/python}"
port="${PORT:-$("$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')}"
logs="${OUT_DIR:-runs/multiprocess-logs}"
mkdir -p "$logs"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; }
trap cleanup EXIT
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=$d" JAX_PLATFORMS=cpu \
    "$py" -m tracealign_jax.cli train --config "$config" "$@" \
      --set "mesh.coordinator=127.0.0.1:$port" --set "mesh.num_processes=$n" --set "mesh.process_id=$i" \
      --no-progress >"$logs/proc-$i.log" 2>&1 &
  pids+=($!)
done
status=0
for p in "${pids[@]}"; do wait "$p" || status=$?; done
trap - EXIT
[ "$status" -eq 0 ] || { echo "a process failed; see $logs/proc-*.log" >&2; tail -n 20 "$logs"/proc-*.log >&2; }
exit "$status"
