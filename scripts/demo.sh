#!/usr/bin/env bash
# lorakit's main job on its embedded default: `lorakit train` with no model and no data fine-tunes
# all-MiniLM-L6-v2 (shipped in a PyPI wheel) on standard-library docstrings, with LoRA r=8 and fully,
# and prints the comparison table. Sets up .venv first. Output: runs/demo/ (or --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorakit train "$@"
