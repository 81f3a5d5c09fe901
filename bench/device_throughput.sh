#!/usr/bin/env bash
# The throughput issue's open measurements on a lent GPU, in two calls of under 10 minutes each,
# from the repository root (carry .whl, .devrun/proxy, .devrun/val, .devrun/ref):
#   bash bench/device_throughput.sh curves  "$OUT"   # 786k: script vs pgolf, 200 steps each (the
#                                                    # loss curves, Hessian-capture stalls)
#   bash bench/device_throughput.sh compile "$OUT"   # compile scopes cold/warm at 48 x 2048, then
#                                                    # 196k: script vs pgolf, and pgolf with
#                                                    # train.compile_scope=blocks (same 48 x 2048
#                                                    # micro-batches: the scopes' step times)
#   bash bench/device_throughput.sh capture "$OUT"   # what a Hessian capture costs (bench_capture),
#                                                    # the model scope's compile cold/warm with
#                                                    # AOTAutograd's cache, then pgolf alone at 196k
#                                                    # (cold compile cache) and 786k (warm: same
#                                                    # 48 x 2048 graph): capture stalls in the loop
# The shards are the first 20 M tokens of the proxy corpus (NOT FineWeb) and the official
# validation prefix; the script is .devrun/ref/train_gpt.py. Each part writes its JSON and log
# under OUT.
set -uo pipefail
part=${1:-} out=${2:-}
if [[ ! $part =~ ^(curves|compile|capture)$ || -z $out ]]; then
  echo "usage: bash bench/device_throughput.sh curves|compile|capture OUT" >&2; exit 2
fi
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site
shards=.devrun/shards_20m
[ -f $shards/proxy_shards.json ] || python3 -m bench.proxy_shards --corpus .devrun/proxy --val .devrun/val \
  --out $shards --workers 16 --max-tokens 20000000 > "$out/shards.log" 2>&1
case $part in
  curves)
    python3 -m bench.bench_vs_ref --batches 786432 --steps 200 --variants 0 --budget 540 \
      --data $shards --ref .devrun/ref/train_gpt.py --out "$out/vs_ref_786k_200steps.json" 2>&1 \
      | tee "$out/curves.log" ;;
  compile)
    timeout 300 python3 -m bench.bench_compile --backend inductor --batch 48x2048 --steps 3 \
      --out "$out/compile_gpu.json" 2>&1 | tee "$out/compile.log"
    python3 -m bench.bench_vs_ref --batches 196608 --variants 0 --budget 260 --data $shards \
      --also "196608 train.compile_scope=blocks" --ref .devrun/ref/train_gpt.py \
      --out "$out/vs_ref_196k.json" 2>&1 | tee "$out/vs_ref_196k.log" ;;
  capture)
    timeout 150 python3 -m bench.bench_capture --compiled --out "$out/capture_gpu.json" 2>&1 | tail -3
    timeout 200 python3 -m bench.bench_compile --backend inductor --batch 48x2048 --steps 3 --scopes model \
      --out "$out/compile_gpu_model.json" 2>&1 | tail -2
    for run in 196608:100 786432:60; do
      timeout 150 python3 -m bench.profile_train --batch-tokens ${run%:*} --steps ${run#*:} --log-every 5 \
        --data $shards --out "$out/pgolf_${run%:*}.json" > "$out/pgolf_${run%:*}.log" 2>&1
      tail -2 "$out/pgolf_${run%:*}.log"
    done ;;
esac
