#!/usr/bin/env bash
# Check lorakit as users install it: `python -m build` (sdist, then the wheel from it) in a temporary venv,
# the wheel installed with its `demo` extra into a fresh venv that has torch, then `lorakit --help` and
# `lorakit train --quick` run from it, outside the checkout. Everything lives in a temporary directory, removed
# at the end; the checkout is not written to. Usage: scripts/check_wheel.sh (PYTHON=python3.11 to choose).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/lorakit-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
started=$SECONDS
# run a step quietly (pip's notices about this machine's index go to a log), showing the log if it fails
step() { "$@" >> "$work/steps.log" 2>&1 || { tail -40 "$work/steps.log"; exit 1; }; }
say() { echo "check_wheel: [$((SECONDS - started)) s] $*"; }

# the files a clone has (tracked, plus new files git does not ignore): no .venv, egg-info or build/ leftovers
mkdir "$work/src"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [ -e "$f" ] && printf '%s\0' "$f"
done | tar --null -T - -cf - | tar -xf - -C "$work/src"

say "building (python -m build: the sdist, then the wheel from it)"
step "$PYTHON" -m venv "$work/build-env"
step "$work/build-env/bin/pip" install --quiet build
step "$work/build-env/bin/python" -m build --outdir "$work/dist" "$work/src"
wheel=$(ls "$work"/dist/lorakit-*.whl)
say "built $(basename "$wheel") and $(cd "$work/dist" && ls ./*.tar.gz | xargs -n1 basename)"

# what the wheel must carry: every module of the checkout's package (the C kernels live in ops/native.py)
"$work/build-env/bin/python" - "$wheel" "$work/src/src/lorakit" <<'EOF'
import sys, zipfile
from pathlib import Path
wheel, package = sys.argv[1], Path(sys.argv[2])
names = set(zipfile.ZipFile(wheel).namelist())
wanted = {"lorakit/" + p.relative_to(package).as_posix() for p in package.rglob("*.py")}
missing = sorted(wanted - names)
if missing:
    sys.exit(f"check_wheel: the wheel lacks {missing}")
if "_SOURCE = r\"\"\"" not in zipfile.ZipFile(wheel).read("lorakit/ops/native.py").decode():
    sys.exit("check_wheel: lorakit/ops/native.py in the wheel has no C source")
print(f"check_wheel: the wheel has all {len(wanted)} modules, the C source among them")
EOF

say "installing into a fresh venv (torch==2.13.0 first, as scripts/setup.sh does; then the wheel with [demo])"
step "$PYTHON" -m venv "$work/env"
# --no-compile: no .pyc for torch's thousands of modules (most of an install's time on a slow disk)
step "$work/env/bin/pip" install --quiet --no-compile "torch==2.13.0"
"$work/env/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" \
  > "$work/torch.txt" 2>/dev/null
step "$work/env/bin/pip" install --quiet --no-compile -c "$work/torch.txt" "$wheel[demo]"
if "$work/env/bin/python" -c "import pytest" 2>/dev/null; then
  echo "check_wheel: pytest is installed in the user's venv: the demo extra pulled a test tool" >&2
  exit 1
fi

cd "$work"  # away from the checkout: nothing may be imported from it
LORAKIT_CACHE="$work/cache" "$work/env/bin/lorakit" --help > /dev/null
say "lorakit --help ok; running lorakit train --quick"
LORAKIT_CACHE="$work/cache" "$work/env/bin/lorakit" train --quick --out "$work/demo" > "$work/demo.log" 2>&1 \
  || { tail -40 "$work/demo.log"; exit 1; }
grep -E "^LoRA reaches" "$work/demo.log" || { tail -20 "$work/demo.log"; exit 1; }
test -d "$work/demo/lora/adapter" || { echo "check_wheel: lorakit train --quick wrote no adapter" >&2; exit 1; }
say "ok"
