#!/usr/bin/env bash
# Time per training step: one process against `mpirun -n N` (data parallel over MPI), with the
# cores split between ranks so they are not oversubscribed (RAYON_NUM_THREADS = cores / N).
#
#   scripts/bench-mpi.sh [--palm target/release/palm] [--config small] [--ranks 2]
#                        [--batch-size 8] [--seq-len 256] [--steps 12] [--rounds 3]
#   scripts/bench-mpi.sh --rl [--batch-size 8] [--steps 4] [--rounds 3]
#
# Needs a palm built with `--features mpi` (cargo build --release -p palm-cli --features mpi).
# Each round runs both, interleaved; a run's step time is the median of its steps after the
# first two (warm-up), read from metrics.jsonl (`tokens_per_sec`). With --rl: `palm rl
# --algorithm grpo` on SmolLM2-135M-Instruct (the shared Q4_1 GGUF) and the arithmetic task,
# batch-size prompts x 4 responses of up to 24 tokens, the median `time/step_s` after the first
# step. Prints one JSON line per run on stdout and the medians over rounds, with the ratio, on
# stderr.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."
palm=target/release/palm config=small ranks=2 batch=8 seq=256 steps=12 rounds=3 rl=0
while [ $# -gt 0 ]; do
  case $1 in
    --palm) palm=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --ranks) ranks=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --seq-len) seq=$2; shift 2 ;;
    --steps) steps=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --rl) rl=1; shift ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
cores=$(nproc)
per_rank=$(( cores / ranks )); [ "$per_rank" -ge 1 ] || per_rank=1
data=${PALM_SHARED_DIR:-../shared}/data/corpora/tinyshakespeare.txt
tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 NO_COLOR=1
args=(train --quiet --config "$config" --data "$data" --seq-len "$seq" --batch-size "$batch"
      --steps "$steps" --eval-every 0 --save-every 0 --seed 1)
if [ "$rl" = 1 ]; then
  gguf=${PALM_SHARED_DIR:-../shared}/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
  [ "$steps" = 12 ] && steps=4
  config=smollm2-grpo seq=24
  args=(rl --algorithm grpo --policy "$gguf" --task arithmetic:1 --train-prompts 64 --heldout 1
        --batch-size "$batch" --group-size 4 --max-new-tokens "$seq" --steps "$steps" --seed 1)
fi

step_ms() { # median ms per step after two warm-up steps, from metrics.jsonl
  python3 - "$1" "$batch" "$seq" "$rl" <<'EOF'
import json, statistics, sys
recs = [json.loads(l) for l in open(sys.argv[1])]
if sys.argv[4] == "1":
    ms = [1000 * r["time/step_s"] for r in recs[1:]]
else:
    toks = int(sys.argv[2]) * int(sys.argv[3])
    ms = [1000 * toks / r["tokens_per_sec"] for r in recs[2:]]
print(f"{statistics.median(ms):.1f}")
EOF
}

one=() many=()
for r in $(seq "$rounds"); do
  RAYON_NUM_THREADS=$cores "$palm" "${args[@]}" --out "$tmp/one-$r" >/dev/null 2>>"$tmp/log"
  a=$(step_ms "$tmp/one-$r/metrics.jsonl")
  mpirun --oversubscribe -n "$ranks" -x RAYON_NUM_THREADS="$per_rank" "$palm" "${args[@]}" \
      --out "$tmp/many-$r" >/dev/null 2>>"$tmp/log"
  b=$(step_ms "$tmp/many-$r/metrics.jsonl")
  one+=("$a"); many+=("$b")
  size="\"tokens_per_step\": $((batch * seq))"
  [ "$rl" = 1 ] && size="\"responses_per_step\": $((batch * 4)), \"max_new_tokens\": $seq"
  echo "{\"round\": $r, \"config\": \"$config\", $size, \"one_process_ms\": $a, \"threads\": $cores, \"mpirun_ms\": $b, \"ranks\": $ranks, \"threads_per_rank\": $per_rank}"
done
python3 - "${one[*]}" "${many[*]}" "$ranks" <<'EOF' >&2
import statistics, sys
a = statistics.median(map(float, sys.argv[1].split()))
b = statistics.median(map(float, sys.argv[2].split()))
print(f"median ms/step: one process {a:.1f}, mpirun -n {sys.argv[3]} {b:.1f} "
      f"(mpirun/one = {b / a:.2f}x the time)")
EOF
