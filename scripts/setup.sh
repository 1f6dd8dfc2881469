#!/usr/bin/env bash
# Set up .venv with lorakit (editable) and its dev tools. Installs torch==2.13.0 first when torch is
# absent, so no dependency can pull a newer torch with its CUDA packages. Safe to run again: it does
# nothing when pyproject.toml has not changed since the last run.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv with $($PYTHON --version)"
  "$PYTHON" -m venv .venv
fi
stamp=".venv/.lorakit-setup-$(sha1sum pyproject.toml | cut -c1-12)"
if [ ! -f "$stamp" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    echo "setup: installing torch==2.13.0"
    .venv/bin/pip install --quiet "torch==2.13.0"
  fi
  echo "setup: installing lorakit and its dev dependencies"
  # the torch now installed is a constraint: no dependency may replace it (a CUDA build is several GB)
  .venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/torch-constraint.txt
  .venv/bin/pip install --quiet -c .venv/torch-constraint.txt -e ".[dev]"
  rm -f .venv/.lorakit-setup-*
  touch "$stamp"
fi
