#!/usr/bin/env bash
# Run an ablation (bench/ablate.py) on a lent GPU machine, from the repository root:
#   bash bench/device_ablate.sh --rows bench/ablation_model.yaml --out "$OUT/model.json" --budget 520
# Needs, carried beside the checkout (git-ignored): .whl/ (dvc and its dependencies, zstandard,
# brotli, for Python 3.12), .devrun/proxy/ (the proxy corpus' docs-*.jsonl.zst) and .devrun/val/
# (the official fineweb_val_000000.bin prefix). Builds .devrun/shards, points DVC at no git.
set -euo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
mkdir -p /tmp/bin && printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v python3)" > /tmp/bin/python
chmod +x /tmp/bin/python && export PATH=/tmp/bin:$PATH  # dvc.yaml runs `python`; a venv's python3 may be all there is
[ -f .devrun/shards/proxy_shards.json ] || \
  python3 -m bench.proxy_shards --corpus .devrun/proxy --val .devrun/val --out .devrun/shards --workers 16
[ -d .git ] || python3 -m dvc config core.no_scm true
python3 -m bench.ablate "$@"
