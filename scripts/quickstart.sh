#!/usr/bin/env bash
# lorakit's main job on an embedded default: attach LoRA to a small Llama built from a config, train,
# save in PEFT's format, reload, merge, and check the outputs. Sets up .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorakit quickstart "$@"
