#!/usr/bin/env bash
# FlashAttention-4 (pip package flash-attn-4) on a lent GPU, from the repository root. Its wheels
# (nvidia-cutlass-dsl's libraries alone are 150 MB) exceed what one call carries (64 MiB), so they
# travel as one tar in pieces of 55,000,000 bytes, one git-ignored folder per piece, one call per
# piece to the same warm machine:
#   bash bench/device_fa4.sh fetch                 # here (needs a package index): FA4_WHEELS for
#       # Python 3.12 on x86-64 -> .devrun/fa4/1, 2, ... (a piece each; the last also the sha256)
#   bash bench/device_fa4.sh stage .devrun/fa4/1   # each call but the last (carry that folder): the
#       # piece kept in /tmp/fa4 (outside the checkout, so it stays while the machine is warm)
#   bash bench/device_fa4.sh install .devrun/fa4/3 OUT [ARGS...]  # the last piece: joined, checked, every
#       # wheel installed into /tmp/site_fa4, then bench_attention (dense and document-packed; ARGS: its
#       # options, e.g. --no-dense --layouts docs)
# Later calls on the same machine reach FA4 with the PYTHONPATH that install wrote, e.g.
#   PYTHONPATH=$(cat /tmp/site_fa4.path) bash bench/device_anchors.sh steps OUT pr1072 25 540 "pgolf reference" \
#       "model.attn_backend=fa4"
# flash-attn-4 4.0.0b18 is the newest whose _flash_attn_fwd returns (out, lse), what torch's flash
# registry (torch.nn.attention._fa4) unpacks; from 4.0.0b19 on it returns more and the registry fails.
set -uo pipefail
FA4_WHEELS=(flash-attn-4==4.0.0b18 nvidia-cutlass-dsl==4.5.3 nvidia-cutlass-dsl-libs-base==4.5.3
  nvidia-cutlass-dsl-libs-cu13==4.5.3 quack-kernels==0.5.0 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
  cuda-python==13.2.0 cuda-bindings==13.2.0 cuda-pathfinder==1.9.1 einops==0.8.1)  # its tree less torch, numpy
part=${1:-} dir=${2:-} out=${3:-}
case $part in
  fetch)
    tmp=$(mktemp -d) && rm -rf .devrun/fa4 && mkdir -p "$tmp/w" || exit 1
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
      --platform manylinux2014_x86_64 -d "$tmp/w" "${FA4_WHEELS[@]}" || exit 1
    (cd "$tmp" && tar cf fa4.tar -C w . && sha256sum fa4.tar > fa4.sha256 && split -b 55000000 -d -a 1 fa4.tar piece.) \
      || exit 1
    n=0; for p in "$tmp"/piece.*; do n=$((n + 1)); mkdir -p ".devrun/fa4/$n" && mv "$p" ".devrun/fa4/$n/"; done
    mv "$tmp/fa4.sha256" ".devrun/fa4/$n/" && rm -rf "$tmp" && du -sh .devrun/fa4/* ;;
  stage)
    [ -d "$dir" ] || { echo "device_fa4.sh stage: no folder $dir" >&2; exit 2; }
    mkdir -p /tmp/fa4 && cp "$dir"/* /tmp/fa4/ && ls -l /tmp/fa4 ;;
  install)
    [ -d "$dir" ] && [ -n "$out" ] || { echo "usage: bash bench/device_fa4.sh install DIR OUT [ARGS]" >&2; exit 2; }
    mkdir -p "$out" /tmp/fa4 && cp "$dir"/* /tmp/fa4/ || exit 1
    (cd /tmp/fa4 && cat piece.* > fa4.tar && sha256sum -c fa4.sha256 && mkdir -p w && tar xf fa4.tar -C w) || exit 1
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site_fa4 /tmp/fa4/w/*.whl \
      || exit 1
    path=/tmp/site_fa4  # plus the wheels' .pth folders (nvidia-cutlass-dsl's python_packages holds `cutlass`):
    for pth in /tmp/site_fa4/*.pth; do  # a --target folder on PYTHONPATH is not a site dir, so no .pth is read
      while IFS= read -r l || [ -n "$l" ]; do [[ -z $l || $l == import* || $l == \#* ]] || path+=:/tmp/site_fa4/$l; done < "$pth"
    done
    echo "$path" > /tmp/site_fa4.path
    export PYTHONPATH=$path PYTHONUNBUFFERED=1
    python3 -c "import flash_attn.cute as f, torch; print('flash_attn.cute', f.__version__, torch.__version__)" 2>&1 \
      | tee "$out/fa4_import.log"
    timeout 420 python3 -m bench.bench_attention --out "$out/attention_fa4.json" "${@:4}" 2>&1 \
      | tee "$out/attention_fa4.log" ;;
  *)
    echo "usage: bash bench/device_fa4.sh fetch | stage DIR | install DIR OUT [ARGS]" >&2; exit 2 ;;
esac
