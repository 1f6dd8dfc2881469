#!/usr/bin/env bash
# Run lorakit's checks: ruff, mypy (the adapter protocol and its implementations), then the test suite (pytest).
# Extra arguments go to pytest, e.g. scripts/test.sh -k merge
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium >/dev/null 2>&1; then
  echo "test.sh: no chromium: the browser test of lorakit report will be skipped (install it: apt-get install -y chromium)"
fi
.venv/bin/ruff check src tests benchmarks
.venv/bin/mypy  # the adapter protocol, the registries and their implementations ([tool.mypy] in pyproject.toml)
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
