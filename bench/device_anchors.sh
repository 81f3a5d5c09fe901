#!/usr/bin/env bash
# The anchors beside pgolf on a lent GPU, from the repository root, each part under 10 minutes:
#   bash bench/device_anchors.sh smoke OUT                      # attention backends (dense and
#       # document-packed) at the record shapes, then the PR #2135 script vs pgolf's pr2135 profile,
#       # 40 steps each at its batch of 786,432 tokens: the steady step ratio
#   bash bench/device_anchors.sh steps OUT ANCHOR STEPS BUDGET [PROGRAMS [ALSO]]  # the script vs its
#       # profile, STEPS each at 786,432 tokens (bench_vs_ref), then a few more of each under
#       # torch.profiler (both programs' top kernels), within BUDGET seconds; PROGRAMS
#       # ("reference", "pgolf"): one half, the other in the next call on the same warm machine;
#       # ALSO ("section.key=value ..."): one more pgolf run with those params after the pair
#   bash bench/device_anchors.sh wallclock OUT ANCHOR ARMS SEED  # arms ("reference", "pgolf", or both
#       # quoted) of bench.equal_wallclock (180 s of training each); merge the calls' JSONs with
#       # `python -m bench.equal_wallclock --merge`
#   bash bench/device_anchors.sh post OUT ANCHOR ARM SEED       # the same arm with its whole
#       # post-training (equal_wallclock --post): final val_bpb, evaluation seconds, artifact bytes
#   bash bench/device_anchors.sh phased OUT [BASE]              # phased TTT's time (bench_phased: the
#       # pr2135 model, random weights, 8 batches of a set modelled on the CaseOps validation
#       # documents): eager, then with evaluate.ttt_compile and the operator profile; BASE (a folder
#       # with an older tree's pgolf and profiles, carried, e.g. `git archive REV pgolf profiles`):
#       # the same eager bench on its code, for a before/after on one GPU
#   bash bench/device_anchors.sh repro OUT PROFILE[,PROFILE...] [SECTION.KEY=VALUE ...]  # `dvc repro` of each
#       # profile end to end on this GPU, one after the other (carry .whl/dvc too: DVC and its needs as wheels),
#       # each in a copy of the tree under $TMPDIR/work/repro_PROFILE (a later call's tree lands on the root), on the
#       # shards below, one process per stage (nproc_per_node 1), the values given over the profile's (e.g.
#       # train.max_wallclock_seconds=60), stopped with all its processes at 540 s each (DEVICE_ANCHORS_DEADLINE);
#       # OUT/repro_PROFILE.tgz holds params.yaml, dvc.lock, metrics/, the logs and the summary
#   bash bench/device_anchors.sh ablate OUT DATA[,DATA...] ROWS [ARGS...]  # bench.ablate of a rows file (e.g.
#       # bench/ablation_pr2135_vs_record.yaml; ARGS: its options, e.g. --seeds 1337,42 --resume) in a copy of the
#       # tree under $TMPDIR/work/ablate holding the shard folders DATA (anchor names, or docs901: sp1024 with the
#       # 901 validation documents); OUT gets ablate.json (rewritten after every run), ablate.log and logs/
#   bash bench/device_anchors.sh background DIR PART ARGS...   # `device_anchors.sh PART DIR ARGS...` in a
#       # process session of its own (setsid), which the lent machine keeps running after the call returns
#       # (the PR #2135 script's cold start alone is about 540 s); DIR, on the machine (e.g. /tmp/bg/ref42),
#       # gets its files, run.log and, once it ends, `done` (its exit status); nothing that trains may run
#       # beside it (the script's compile runs its steps: two arms of ~40 GB overflow an 80 GB card), so
#       # the other parts that use the GPU refuse to start until it is done
#   bash bench/device_anchors.sh collect OUT DIR WAIT           # wait up to WAIT s (from its own start;
#       # after other parts pass $((570-SECONDS))) for DIR/done, then DIR as one tar in OUT, but for DIR/big,
#       # whose files come as 15 MiB pieces NAME.partNN and NAME.sha256 (e.g. the ablate part's
#       # `--keep-quant DIR/big`; here: cat NAME.part* > NAME); a call returns at most 8 files
# Carry (git-ignored): .whl (zstandard, brotli, python-minifier wheels for Python 3.12; .whl/lrzip: the
# lrzip program and its liblzo2, put first on PATH),
# .devrun/proxy (the proxy corpus' docs-*.jsonl.zst), .devrun/val (the official sp1024
# fineweb_val_000000.bin prefix), .devrun/val901 (the 901 validation docs, docs.jsonl.zst),
# .devrun/anchors (the anchor scripts) and .devrun/fa3_stub (a flash_attn_interface stand-in).
# Shards, built here from the proxy corpus (NOT FineWeb): CaseOps SP8192 for PR #2135 (validation:
# the 901 docs, with the byte sidecar), sp1024 for PR #535 / #1072 (validation: the official prefix).
set -uo pipefail
part=${1:-} out=${2:-}
if [[ ! $part =~ ^(smoke|steps|wallclock|post|phased|repro|ablate|background|collect)$ || -z $out ]]; then
  echo "usage: bash bench/device_anchors.sh smoke OUT | steps OUT ANCHOR STEPS BUDGET [PROGRAMS] |" \
       "wallclock|post OUT ANCHOR ARM SEED | phased OUT [BASE] | repro OUT PROFILE[,...] [SETS] |" \
       "ablate OUT DATA[,...] ROWS [ARGS] |" \
       "background DIR PART ARGS... | collect OUT DIR WAIT" >&2; exit 2
fi
mkdir -p "$out" && out=$(cd "$out" && pwd)
registry=${TMPDIR:-/tmp}/device_anchors_background  # the folders of background parts, one a line
if [[ $part =~ ^(smoke|steps|wallclock|post|phased|repro|ablate|background)$ && -f $registry ]]; then  # each needs the GPU alone
  while read -r dir; do
    if [ "$dir" != "${DEVICE_ANCHORS_SELF:-}" ] && [ ! -f "$dir/done" ]; then
      echo "device_anchors: a background part still runs in $dir (two training runs overflow one card);" \
           "wait for it with: bash bench/device_anchors.sh collect OUT $dir WAIT (or, if it died, drop" \
           "its line from $registry)" >&2; exit 2
    fi
  done < "$registry"
fi
site=${TMPDIR:-/tmp}/site  # the carried wheels, installed once per machine
[ -d "$site/zstandard" ] ||  # (a background part and the foreground would race)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl
export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
if [ -x .whl/lrzip/usr/bin/lrzip ]; then  # lrzip ZPAQ for per-group compression, pgolf's and PR #2135's
  export PATH=$PWD/.whl/lrzip/usr/bin:$PATH LD_LIBRARY_PATH=$PWD/.whl/lrzip/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  lrzip -V > /dev/null 2>&1 || echo "device_anchors: the carried lrzip does not run here; per-group compression goes without it" >&2
fi
data_for() {  # anchor (or docs901) -> its shard folder, built once per machine
  if [ "$1" = docs901 ]; then  # sp1024, validation the 901 documents (PR #2135's scored text, uncased)
    [ -f .devrun/shards_901/proxy_shards.json ] || python3 -m bench.proxy_shards --corpus .devrun/proxy \
      --val-docs .devrun/val901/docs.jsonl.zst --workers 16 --out .devrun/shards_901 > "$out/shards_901.log" 2>&1
    echo .devrun/shards_901
  elif [ "$1" = pr2135 ]; then
    [ -f .devrun/shards_caseops/proxy_shards.json ] || python3 -m bench.proxy_shards --corpus .devrun/proxy \
      --val-docs .devrun/val901/docs.jsonl.zst --text-transform caseops --shard-tokens 4000000 --workers 16 \
      --out .devrun/shards_caseops > "$out/shards_caseops.log" 2>&1
    echo .devrun/shards_caseops
  else
    [ -f .devrun/shards/proxy_shards.json ] || python3 -m bench.proxy_shards --corpus .devrun/proxy \
      --val .devrun/val --workers 16 --out .devrun/shards > "$out/shards_sp1024.log" 2>&1
    echo .devrun/shards
  fi
}
private_copy() {  # NAME DATA... -> $TMPDIR/work/NAME: the tree (less .devrun, .whl, .venv, .git) and the shard
  # folders DATA, a git repo (DVC needs one); each call's tree lands on the root, not on a running copy
  local work=${TMPDIR:-/tmp}/work/$1 d; shift
  rm -rf "$work" && mkdir -p "$work" || return 1
  tar -C "$root" --exclude=./.devrun --exclude=./.whl --exclude=./.venv --exclude=./.git -cf - . | tar -C "$work" -xf - \
    || return 1
  for d in "$@"; do mkdir -p "$work/$(dirname "$d")" && cp -r "$root/$d" "$work/$d" || return 1; done
  (cd "$work" && git init -q && git add -A && git -c user.name=device -c user.email=device@localhost commit -qm copy) \
    || return 1
  echo "$work"
}
dvc_python() {  # dvc.yaml's `python`: this python3 (a symlink would lose a venv's packages), and DVC itself
  [ -d "$site/dvc" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --target "$site" .whl/dvc/*.whl || return 1
  local bin=${TMPDIR:-/tmp}/bin
  mkdir -p "$bin" && printf '#!/bin/sh\nexec %s "$@"\n' "$(python3 -c 'import sys; print(sys.executable)')" \
    > "$bin/python" && chmod +x "$bin/python" && export PATH=$bin:$PATH
}
root=$PWD
case $part in
  smoke)
    data=$(data_for pr2135)
    timeout 150 python3 -m bench.bench_attention --out "$out/attention.json" \
      --shard "$data/fineweb_train_000000.bin" > "$out/attention.log" 2>&1; tail -4 "$out/attention.log"
    python3 -m bench.bench_vs_ref --anchor pr2135 --stub-dir .devrun/fa3_stub --batches 786432 --steps 40 \
      --variants 0 --budget 380 --data "$data" --out "$out/vs_ref_pr2135.json" 2>&1 | tee "$out/vs_ref.log" ;;
  steps)
    anchor=${3:?anchor} steps=${4:?steps} budget=${5:?budget} programs=${6:-pgolf reference} also=${7:-}
    data=$(data_for "$anchor")
    extra=(); [ -n "$also" ] && extra=(--also "786432 $also")
    # shellcheck disable=SC2086  # PROGRAMS is a list of words
    python3 -m bench.bench_vs_ref --anchor "$anchor" --stub-dir .devrun/fa3_stub --batches 786432 --steps "$steps" \
      --variants 0 --budget "$budget" --programs $programs --data "$data" --profile-reference "${extra[@]}" \
      --out "$out/vs_ref_${anchor}_${programs// /_}.json" 2>&1 | tee "$out/vs_ref_$anchor.log" ;;
  phased)
    val=$root/$(data_for pr2135)/fineweb_val_000000.bin base=${3:-}
    left() { local n=$(( $1 < 585 - SECONDS ? $1 : 585 - SECONDS )); echo $(( n > 1 ? n : 1 )); }  # within 600 s
    timeout "$(left 200)" python3 -m bench.bench_phased --tokens "$val" --out "$out/phased.json" 2>&1 \
      | tee "$out/phased.log"
    timeout "$(left 300)" python3 -m bench.bench_phased --tokens "$val" --ops --set evaluate.ttt_compile=true \
      --out "$out/phased_compiled.json" 2>&1 | tee "$out/phased_compiled.log"
    [ -z "$base" ] || (cd "$base" && ln -sfn "$root/bench" bench && PYTHONPATH=$site:. timeout "$(left 200)" \
      python3 -m bench.bench_phased --tokens "$val" --out "$out/phased_base.json" 2>&1 | tee "$out/phased_base.log") ;;
  repro)
    profiles=${3:?profile} deadline=${DEVICE_ANCHORS_DEADLINE:-540} status=0  # deadline: s per profile
    dvc_python || exit 1
    for profile in ${profiles//,/ }; do
      data=$(data_for "$profile") && work=$(private_copy "repro_$profile" "$data") || exit 1
      sets=("prepare.corpus=$data" "prepare.val_source=$data")  # the val shards beside the train ones
      [ "$profile" = pr2135 ] || sets+=("prepare.tokenizer=data/tokenizer_src/fineweb_1024_bpe.model")
      files=$out/repro_$profile && mkdir -p "$files"  # packed into OUT/repro_PROFILE.tgz (few files come back)
      (cd "$work" && python3 -m pgolf profiles "$profile" --set "${sets[@]}" train.nproc_per_node=1 \
        evaluate.nproc_per_node=1 "${@:4}") > "$files/profile.log" 2>&1 || { cat "$files/profile.log"; exit 1; }
      t0=$SECONDS
      (cd "$work" && exec setsid python3 -m dvc repro) > "$files/repro.log" 2>&1 &  # a process group: the stages too
      pid=$!
      while kill -0 "$pid" 2>/dev/null && [ $((SECONDS - t0)) -lt "$deadline" ]; do sleep 1; done
      if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid"; sleep 3; kill -KILL -- "-$pid" 2>/dev/null
        echo "dvc repro: stopped at the deadline, ${deadline} s" | tee -a "$files/repro.log"
      fi
      wait "$pid"; rc=$?; [ "$rc" = 0 ] || status=1
      echo "dvc repro $profile: exit $rc after $((SECONDS - t0)) s"; grep -E "^(Running stage|ERROR)" "$files/repro.log"
      (cd "$work" && cp -r params.yaml dvc.lock metrics "$files/" 2>/dev/null
       python3 -m pgolf summary > "$files/summary.txt" 2>&1); cat "$files/summary.txt"
      tar -C "$out" -czf "$files.tgz" "repro_$profile" && rm -rf "$files"
    done
    exit "$status" ;;
  ablate)
    kinds=${3:?data} rows=${4:?rows}
    dvc_python || exit 1
    folders=(); for kind in ${kinds//,/ }; do folders+=("$(data_for "$kind")"); done
    work=$(private_copy ablate "${folders[@]}") || exit 1
    cd "$work" && python3 -m bench.ablate --rows "$rows" --out "$out/ablate.json" --log-dir "$out/logs" "${@:5}" \
      2>&1 | tee "$out/ablate.log" ;;
  background)
    sub=${3:?part}
    if [[ $sub =~ ^(steps|wallclock|post|repro|ablate)$ ]]; then  # the shards, built here, not beside the foreground
      a=${4:?anchor}; for anchor in ${a//,/ }; do data_for "$anchor" > /dev/null; done
    fi
    rm -f "$out/done" && echo "$out" >> "$registry"
    # shellcheck disable=SC2016  # expanded by the inner shell
    DEVICE_ANCHORS_SELF=$out setsid nohup bash -c \
      'd=$1; shift; bash bench/device_anchors.sh "$@" > "$d/run.log" 2>&1; echo $? > "$d/done"' \
      _ "$out" "$sub" "$out" "${@:4}" < /dev/null > /dev/null 2>&1 &
    echo "background: $sub in $out (pid $!)" ;;
  collect)
    dir=${3:?dir} wait=${4:-0}
    while [ ! -f "$dir/done" ] && [ "$SECONDS" -lt "$wait" ]; do sleep 5; done
    if [ -f "$dir/done" ]; then echo "collect: $dir ended, exit $(cat "$dir/done")"; else echo "collect: $dir still running"; fi
    tar -C "$(dirname "$dir")" --exclude="$(basename "$dir")/big" -czf "$out/$(basename "$dir").tgz" "$(basename "$dir")"
    for f in "$dir"/big/*; do  # files over the 16 MiB a returned file may hold: 15 MiB pieces beside the tar
      [ -f "$f" ] || continue
      split -b 15M -d -a 2 "$f" "$out/$(basename "$f").part" && sha256sum "$f" | cut -d' ' -f1 > "$out/$(basename "$f").sha256"
      echo "collect: $(basename "$f") ($(stat -c %s "$f") bytes) in $(ls "$out/$(basename "$f")".part* | wc -l) pieces"
    done ;;
  wallclock|post)
    anchor=${3:?anchor} arm=${4:?arm} seed=${5:?seed}
    data=$(data_for "$anchor")
    flag=(); [ "$part" = post ] && flag=(--post)
    # shellcheck disable=SC2086  # ARMS is a list of words
    python3 -m bench.equal_wallclock --anchor "$anchor" --arms $arm --seeds "$seed" --data "$data" "${flag[@]}" \
      --stub-dir .devrun/fa3_stub --budget 570 --out "$out/${part}_${anchor}_${arm// /_}_${seed}.json" 2>&1 \
      | tee "$out/${part}_${anchor}_${arm// /_}_${seed}.log" ;;
esac
