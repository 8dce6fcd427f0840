#!/usr/bin/env bash
# What a user installs, checked the way a user would: build a wheel from this checkout, install
# it (not editable) into a fresh virtual environment, and from a directory outside the checkout
# run the README's usage example, `rmt-fast --help`, `rmt-fast train --help` and a short demo.
# Usage: scripts/check_wheel.sh [PYTHON]   (PYTHON: the interpreter whose torch builds the wheel;
# default .venv/bin/python). Part of `make test` (and so of CI).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${1:-$ROOT/.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

TORCH_VERSION=$("$PY" -c "import torch; print(torch.__version__.split('+')[0])")
echo "== building the wheel (extension against torch $TORCH_VERSION)"
# a clean copy: only tracked and untracked-but-not-ignored files, as a fresh clone would have
mkdir "$WORK/src"
(cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | xargs -0 cp --parents -t "$WORK/src")
MAX_JOBS=2 RMT_FAST_REQUIRE_EXT=1 "$PY" -m pip wheel -q --no-build-isolation --no-deps -w "$WORK/dist" "$WORK/src"
ls "$WORK"/dist

echo "== fresh venv: torch==$TORCH_VERSION, then the wheel with its demo extra"
python3 -m venv "$WORK/venv"
VPY="$WORK/venv/bin/python"
"$VPY" -m pip install -q "torch==$TORCH_VERSION" 2>&1 | grep -v "^WARNING: Location" || true
WHEEL=$(ls "$WORK"/dist/rmt_fast-*.whl)
"$VPY" -m pip install -q "$WHEEL[demo]" 2>&1 | grep -v "^WARNING: Location" || true
"$VPY" -c "import rmt_fast" # fails the script if the install did not work

cd "$WORK"  # outside the checkout: nothing can come from the source tree
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1  # one thread: steady on a shared machine
echo "== import and top-level names"
"$VPY" - <<'PY'
import os
import rmt_fast
from rmt_fast import _extension
assert "site-packages" in rmt_fast.__file__, rmt_fast.__file__
assert _extension.HAS_EXTENSION, _extension.EXTENSION_ERROR
for name in rmt_fast.__all__:
    getattr(rmt_fast, name)
print("rmt_fast", rmt_fast.__version__, "from", os.path.dirname(rmt_fast.__file__), "with rmt_fast._C")
PY
echo "== the README usage example"
awk '/^```python/{on=1; next} /^```/{if (on) exit} on' "$ROOT/README.md" > readme_example.py
"$VPY" readme_example.py
echo "== rmt-fast --help, rmt-fast train --help"
"$WORK/venv/bin/rmt-fast" --help
"$WORK/venv/bin/rmt-fast" train --help > /dev/null
echo "== rmt-fast demo --tokens 20000"
"$WORK/venv/bin/rmt-fast" demo --tokens 20000 --no-progress
echo "== wheel check passed"
