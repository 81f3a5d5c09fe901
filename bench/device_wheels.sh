#!/usr/bin/env bash
# The git-ignored folders a lent GPU call carries for bench/device_anchors.sh, rebuilt on this machine
# (a fresh checkout has none of them), from the repository root after `bash scripts/setup.sh dev`:
#   bash bench/device_wheels.sh
# .whl      zstandard, brotli and python-minifier wheels for the lent image's Python 3.12
# .whl/lrzip  Debian's lrzip program and its liblzo2 (apt-get download, unpacked), for per-group ZPAQ
# .whl/dvc  DVC and every package it needs that the image lacks, at the versions .venv runs
#           (a package without a 3.12 wheel, e.g. antlr4-python3-runtime, is built here as a wheel)
# .devrun/proxy/docs-000.jsonl.zst  the first file of the proxy corpus (../shared/data/proxy_corpus)
# .devrun/val901/docs.jsonl.zst     the 901 FineWeb validation documents (data/corpus/val)
# Then carry: [".whl", ".devrun/proxy", ".devrun/val901"].
set -euo pipefail
cd "$(dirname "$0")/.."
shared=${PGOLF_SHARED:-../shared}
[ -x .venv/bin/python ] || { echo "device_wheels: no .venv here; run bash scripts/setup.sh dev first" >&2; exit 2; }
[ -f "$shared/data/proxy_corpus/docs-000.jsonl.zst" ] || {
  echo "device_wheels: $shared/data/proxy_corpus/docs-000.jsonl.zst not found (set PGOLF_SHARED)" >&2; exit 2; }
target=(--only-binary=:all: --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
in_image="numpy pyyaml tqdm torch triton sentencepiece filelock jinja2 markupsafe networkx sympy mpmath typing-extensions setuptools pip"
# DVC's dependency closure as .venv resolved it, for the image's Python (bench/wheel_closure.py)
# shellcheck disable=SC2086  # in_image is a list of names
reqs=$(.venv/bin/python -m bench.wheel_closure dvc --skip $in_image) || exit 1
rm -rf .whl && mkdir -p .whl/dvc .devrun/proxy .devrun/val901
pip_q() { python3 -m pip "$@" -q --no-deps 2>&1 | grep -v '^WARNING' || true; }
for req in $reqs; do
  python3 -m pip download -q --no-deps "${target[@]}" -d .whl/dvc "$req" > /dev/null 2>&1 \
    || pip_q wheel -w .whl/dvc "$req"  # no 3.12 wheel on the index: build one here
done
for req in zstandard brotli python-minifier; do pip_q download "${target[@]}" -d .whl "$req"; done
debs=$(mktemp -d) && (cd "$debs" && apt-get download -q lrzip liblzo2-2 > /dev/null 2>&1) \
  && for deb in "$debs"/*.deb; do dpkg-deb -x "$deb" .whl/lrzip; done && rm -rf .whl/lrzip/usr/share \
  || echo "device_wheels: no lrzip (apt-get download lrzip liblzo2-2 failed); the lent GPU goes without it" >&2
rm -rf "$debs"
cp "$shared/data/proxy_corpus/docs-000.jsonl.zst" .devrun/proxy/
cp data/corpus/val/fineweb_val_first901.jsonl.zst .devrun/val901/docs.jsonl.zst
missing=$(for req in $reqs; do ls .whl/dvc | grep -qi "^$(echo "${req%%==*}" | tr -- '-' '_')-" || echo "$req"; done)
[ -z "$missing" ] || { echo "device_wheels: no wheel for: $missing" >&2; exit 1; }
echo "device_wheels: $(ls .whl/dvc | wc -l) DVC wheels, $(ls .whl/*.whl | wc -l) others; $(du -sh .whl .devrun | tr '\n\t' '  ')"
