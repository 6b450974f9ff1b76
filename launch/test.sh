#!/usr/bin/env bash
# The test suite: sets up .venv (with the test and tpu-aot extras) and runs pytest.
# Extra arguments go to pytest, e.g. `./launch/test.sh tests/test_config.py -k overrides`.
# Two pytest workers by default (PYTEST_WORKERS=0 runs in one process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/launch/setup_env.sh" "test,tpu-aot"
cd "$root"
exec python -m pytest -q -p no:cacheprovider -n "${PYTEST_WORKERS:-2}" "$@"
