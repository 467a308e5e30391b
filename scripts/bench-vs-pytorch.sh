#!/usr/bin/env bash
# Side-by-side throughput: `palm bench` against the PyTorch original (palm-rlhf-pytorch 0.8.0) on
# the same configs, interleaved (ours, theirs, ours, theirs, ...) so machine noise hits both alike.
# Prints per workload: median tokens/s of each, the ratio ours/theirs, and peak RSS.
#
#   scripts/bench-vs-pytorch.sh                 # all workloads, 3 rounds
#   ROUNDS=5 WORKLOADS="train:small train:base" scripts/bench-vs-pytorch.sh
#   WORKLOADS="train-bf16:small train-bf16:base" scripts/bench-vs-pytorch.sh   # ours --precision bf16
#                                                  # (AMX) against PyTorch's bf16 autocast
#   WORKLOADS="decode:smollm2 sample:smollm2 train:smollm2 train-lora:smollm2" \
#       scripts/bench-vs-pytorch.sh   # a real model: the SmolLM2-135M-Instruct GGUF (SMOLLM2=path
#       to override) against PyTorch + transformers loading the same GGUF (dequantised to fp32);
#       sample is batch 16 x 128 new tokens, train a step of batch 8 x 256 with AdamW (train-lora:
#       LoRA r 16 on q, k, v, o with peft); decode is also run by llama.cpp (llama-cpp-python,
#       built in the venv) on the GGUF as it is, at the same thread count
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv-bench}
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-3}
WORKLOADS=${WORKLOADS:-"train:small train:base sample:small decode:small generate:small reward:small"}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "palm-rlhf-pytorch==0.8.0" torch
fi
SMOLLM2=${SMOLLM2:-../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
case " $WORKLOADS " in *smollm2*)
  "$VENV/bin/python" -c "import transformers, gguf, peft" 2>/dev/null ||
    "$VENV/bin/pip" install -q transformers gguf sentencepiece protobuf peft ;;
esac
case " $WORKLOADS " in *decode:smollm2*)
  # builds llama.cpp from source (a few minutes on 2 cores, once)
  "$VENV/bin/python" -c "import llama_cpp" 2>/dev/null || "$VENV/bin/pip" install -q llama-cpp-python ;;
esac
cargo build -q --release -p palm-cli
PALM=target/release/palm
PY="$VENV/bin/python scripts/bench_pytorch.py"

declare -A OURS THEIRS ORSS TRSS LLAMA
for w in $WORKLOADS; do
  kind=${w%%:*}; cfg=${w##*:}
  ours_args=(); theirs_args=()
  if [ "$kind" = train-bf16 ]; then
    kind=train; ours_args=(--precision bf16); theirs_args=(--bf16)
  fi
  if [ "$kind" = train-lora ]; then
    kind=train; ours_args=(--lora-r 16); theirs_args=(--lora-r 16)
  fi
  shape=(--new-tokens 128)
  if [ "$kind" = train ] && [ "$cfg" = smollm2 ]; then shape=(--batch-size 8 --seq-len 256); fi
  for r in $(seq "$ROUNDS"); do
    if [ "$cfg" = smollm2 ]; then
      # a real model: ours from the GGUF, theirs transformers on the same GGUF
      o=$($PALM bench "$kind" --model "$SMOLLM2" "${shape[@]}" --runs "$RUNS" "${ours_args[@]}")
      echo "ours    $w round $r: $o" >&2
      OURS[$w]+="$(echo "$o" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])') "
      ORSS[$w]=$(echo "$o" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["peak_rss_mb"]))')
      t=$("$VENV/bin/python" scripts/bench_transformers.py "$kind" --model "$SMOLLM2" "${shape[@]}" --runs "$RUNS" "${theirs_args[@]}")
      echo "transformers $w round $r: $t" >&2
      THEIRS[$w]+="$(echo "$t" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])') "
      TRSS[$w]=$(echo "$t" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["peak_rss_mb"]))')
      if [ "$kind" = decode ]; then
        l=$("$VENV/bin/python" scripts/bench_llamacpp.py --model "$SMOLLM2" --new-tokens 128 --runs "$RUNS" --threads "$(nproc)")
        echo "llama.cpp $w round $r: $l" >&2
        LLAMA[$w]+="$(echo "$l" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])') "
      fi
      continue
    fi
    if [ "$kind" != generate ]; then
      o=$($PALM bench "$kind" --config "$cfg" --runs "$RUNS" "${ours_args[@]}")
      echo "ours    $w round $r: $o" >&2
      OURS[$w]+="$(echo "$o" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])') "
      ORSS[$w]=$(echo "$o" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["peak_rss_mb"]))')
    fi
    t=$($PY "$kind" --config "$cfg" --runs "$RUNS" "${theirs_args[@]}")
    echo "pytorch $w round $r: $t" >&2
    THEIRS[$w]+="$(echo "$t" | python3 -c 'import json,sys; print(json.load(sys.stdin)["tokens_per_sec"])') "
    TRSS[$w]=$(echo "$t" | python3 -c 'import json,sys; print(round(json.load(sys.stdin)["peak_rss_mb"]))')
  done
done

median() { python3 -c 'import statistics,sys; v=[float(x) for x in sys.argv[1:]]; print(f"{statistics.median(v):.1f}" if v else "-")' $1; }
printf "%-16s %14s %14s %8s %10s %10s\n" workload "ours tok/s" "pytorch tok/s" ratio "ours MB" "torch MB"
for w in $WORKLOADS; do
  o=$(median "${OURS[$w]:-}"); t=$(median "${THEIRS[$w]}")
  if [ "${w%%:*}" = generate ]; then
    # the original's uncached generate, against our cached sampling of the same size
    o=$(median "${OURS[sample:${w##*:}]:-}")
  fi
  ratio=$(python3 -c "import sys; o,t=sys.argv[1:]; print('-' if o=='-' else f'{float(o)/float(t):.2f}x')" "$o" "$t")
  printf "%-16s %14s %14s %8s %10s %10s\n" "$w" "$o" "$t" "$ratio" "${ORSS[$w]:-${ORSS[sample:${w##*:}]:-}}" "${TRSS[$w]}"
done
for w in "${!LLAMA[@]}"; do
  o=$(median "${OURS[$w]}"); l=$(median "${LLAMA[$w]}")
  printf "%-16s ours %s tok/s, llama.cpp %s tok/s: %s\n" "$w" "$o" "$l" \
    "$(python3 -c "import sys; print(f'{float(sys.argv[1])/float(sys.argv[2]):.2f}x')" "$o" "$l")"
done
