#!/usr/bin/env bash
# FlashAttention-4 (pip package flash-attn-4) on a lent GPU, from the repository root. Its
# nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB and a call carries 64 MiB, so the wheels come in
# two calls to one warm machine (git-ignored folders, made as docs/performance.md says):
#   bash bench/device_fa4.sh stage .devrun/fa4a          # call 1 (carry .devrun/fa4a): the first
#       # piece of the cu13 wheel, kept in /tmp/fa4 (outside the checkout, so it stays while warm)
#   bash bench/device_fa4.sh install .devrun/fa4b OUT    # call 2 (carry .devrun/fa4b): the second
#       # piece joined and checked against cu13.sha256, every wheel installed into /tmp/site_fa4,
#       # then bench_attention (dense and document-packed, FA4 beside SDPA's and flex's kernels)
# Later calls on the same machine reach FA4 with PYTHONPATH=/tmp/site_fa4, e.g.
#   PYTHONPATH=/tmp/site_fa4 bash bench/device_anchors.sh steps OUT pr1072 25 540 "pgolf reference" \
#       "model.attn_backend=fa4"
set -uo pipefail
part=${1:-} dir=${2:-} out=${3:-}
case $part in
  stage)
    [ -d "$dir" ] || { echo "device_fa4.sh stage: no folder $dir" >&2; exit 2; }
    mkdir -p /tmp/fa4 && cp "$dir"/* /tmp/fa4/ && ls -l /tmp/fa4 ;;
  install)
    [ -d "$dir" ] && [ -n "$out" ] || { echo "usage: bash bench/device_fa4.sh install DIR OUT" >&2; exit 2; }
    mkdir -p "$out" /tmp/fa4 && cp "$dir"/* /tmp/fa4/
    whl=$(awk '{print $2}' /tmp/fa4/cu13.sha256)
    cat /tmp/fa4/cu13.part.* > "/tmp/fa4/$whl" && (cd /tmp/fa4 && sha256sum -c cu13.sha256) || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_fa4 /tmp/fa4/*.whl \
      || exit 1
    export PYTHONPATH=/tmp/site_fa4 PYTHONUNBUFFERED=1
    python3 -c "import flash_attn.cute as f, torch; print('flash_attn.cute', f.__version__, torch.__version__)" 2>&1 \
      | tee "$out/fa4_import.log"
    timeout 420 python3 -m bench.bench_attention --out "$out/attention_fa4.json" 2>&1 | tee "$out/attention_fa4.log" ;;
  *)
    echo "usage: bash bench/device_fa4.sh stage DIR | install DIR OUT" >&2; exit 2 ;;
esac
