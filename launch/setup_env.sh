#!/usr/bin/env bash
# Creates ./.venv with Python >= 3.11 if missing and installs tracealign-jax with the extras given
# as arguments (e.g. `test,tpu-aot`). Re-installs only when pyproject.toml or the extras change.
# Sourced by demo.sh and test.sh; needs nothing but python3 (3.11+) and pip on the machine.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
extras="${1:-}"
py="${PYTHON:-python3}"
"$py" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "tracealign-jax needs Python >= 3.11")'
if [ ! -x "$root/.venv/bin/python" ]; then
  echo "[setup] creating $root/.venv"
  "$py" -m venv "$root/.venv"
fi
stamp="$root/.venv/.installed-$( (cat "$root/pyproject.toml"; echo "$extras") | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing tracealign-jax${extras:+[$extras]} into .venv (first run takes a few minutes)"
  "$root/.venv/bin/python" -m pip install -q --upgrade pip
  # torch is pinned in the test extra (2.13.0, CPU wheel); an unpinned torch would pull a CUDA build.
  "$root/.venv/bin/python" -m pip install -q -e "$root${extras:+[$extras]}"
  rm -f "$root"/.venv/.installed-*
  touch "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
