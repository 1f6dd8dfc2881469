#!/usr/bin/env bash
# Run lorakit's checks: ruff, then the test suite (pytest). Sets up .venv first.
# Extra arguments go to pytest, e.g. scripts/test.sh -k merge
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests benchmarks
set +e
.venv/bin/python -m pytest "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then  # pytest: no tests collected
  if [ "$#" -gt 0 ]; then
    echo "test.sh: no test matched the arguments: $*"
    exit 0
  fi
  echo "test.sh: the suite collected no tests: that is a broken suite, not a pass" >&2
  exit 1
fi
exit "$status"
