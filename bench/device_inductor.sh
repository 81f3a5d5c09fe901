#!/usr/bin/env bash
# Inductor-config variants of pgolf's training loop on a lent GPU (bench.profile_train per variant),
# from the repository root:   bash bench/device_inductor.sh OUT_DIR BATCH_TOKENS "VARIANT" ...
# Each VARIANT is a space-separated list of torch._inductor.config overrides (key=value), "" for
# the default; each runs in its own process with its own compile cache, so every figure includes a
# cold compile. Needs .whl/zstandard-*.whl, .devrun/proxy and .devrun/val (see bench/device_ablate.sh). Writes
# OUT_DIR/variant_<i>.json and .log, and the Triton code of the default variant's kernels.
set -uo pipefail
out=$1 batch=$2; shift 2
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/zstandard-*.whl
export PYTHONPATH=/tmp/site
shards=.devrun/shards_20m  # the first 20 M tokens; bench/device_ablate.sh's .devrun/shards holds all of them
[ -f $shards/proxy_shards.json ] || python3 -m bench.proxy_shards --corpus .devrun/proxy \
  --val .devrun/val --out $shards --workers 16 --max-tokens 20000000 > "$out/shards.log" 2>&1
i=0
for variant in "$@"; do
  cache=/tmp/inductor_$i
  # shellcheck disable=SC2086
  TORCHINDUCTOR_CACHE_DIR=$cache timeout 200 python3 -m bench.profile_train --data $shards \
    --batch-tokens "$batch" --steps 20 --profile-steps 2 --out "$out/variant_$i.json" \
    ${variant:+--inductor $variant} > "$out/variant_$i.log" 2>&1
  echo "variant $i [$variant] rc=$? $(grep -o '"step_ms_steady": [0-9.]*' "$out/variant_$i.log" | head -1)"
  if [ "$i" = 0 ]; then
    (cd "$cache" && find . -name '*.py' -size -400k | tar czf "$out/kernels_default.tgz" -T -)
  fi
  i=$((i + 1))
done
