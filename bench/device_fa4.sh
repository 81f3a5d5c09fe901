#!/usr/bin/env bash
# FlashAttention-4 (pip package flash-attn-4) on a lent GPU, from the repository root. Its
# nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB and a call carries 64 MiB, so the wheels come in
# two calls to one warm machine, from two git-ignored folders:
#   bash bench/device_fa4.sh fetch                       # here (needs a package index): the wheels for
#       # Python 3.12 on x86-64 into .devrun/fa4a (the cu13 wheel's first 55,000,000 bytes) and
#       # .devrun/fa4b (the rest, its sha256, every other wheel)
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
FA4_WHEELS=(flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
  nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 quack-kernels==0.6.5
  apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 cuda-bindings==13.5.0 cuda-pathfinder==1.9.1
  protobuf==7.36.2 einops==0.8.1)  # flash-attn-4's dependency tree less torch (the lent image has it)
case $part in
  fetch)
    tmp=$(mktemp -d) && rm -rf .devrun/fa4a .devrun/fa4b && mkdir -p .devrun/fa4a .devrun/fa4b || exit 1
    for w in "${FA4_WHEELS[@]}"; do
      python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
        --platform manylinux2014_x86_64 -d "$tmp" "$w" || exit 1
    done
    (cd "$tmp" && sha256sum nvidia_cutlass_dsl_libs_cu13-*.whl > cu13.sha256 && split -b 55000000 \
      nvidia_cutlass_dsl_libs_cu13-*.whl cu13.part. && rm nvidia_cutlass_dsl_libs_cu13-*.whl) || exit 1
    mv "$tmp"/cu13.part.aa .devrun/fa4a/ && mv "$tmp"/* .devrun/fa4b/ && rmdir "$tmp" && du -sh .devrun/fa4a .devrun/fa4b ;;
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
    echo "usage: bash bench/device_fa4.sh fetch | stage DIR | install DIR OUT" >&2; exit 2 ;;
esac
