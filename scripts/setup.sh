#!/usr/bin/env bash
# Create .venv and install pgolf with a CPU build of torch (pinned, so no CUDA packages are pulled).
#   bash scripts/setup.sh        # runtime deps
#   bash scripts/setup.sh dev    # + test deps
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "dev" ] && extra="[dev]"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".${extra}"
