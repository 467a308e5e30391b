#!/usr/bin/env bash
# Side-by-side wall time of one GRPO optimisation step (rollout + scoring + reference + update) on
# SmolLM2-135M-Instruct: `palm rl --algorithm grpo --task arithmetic:2` against TRL's GRPOTrainer
# on CPU (scripts/bench_trl_grpo.py: the same GGUF through transformers, dequantised to fp32, LoRA
# r=8 alpha=8 on q/k/v/o_proj, AdamW lr 1e-3, loss_type "grpo", beta 0.04, temperature 1).
# Runs ours first, then TRL, never both at once. Each figure is the median over steps 2..S
# (step 1 is warm-up; model loading is outside both). Prints to stdout one JSON line per
# framework, then {"speedup": seconds_trl / seconds_ours, ...}; progress goes to stderr.
#
#   scripts/bench-vs-trl.sh [--steps S] [--batch-size B] [--group-size G] [--max-new-tokens L]
#                           [--threads T]
#
# Defaults S=4, B=4, G=4, L=32. One step is B prompts x G completions of at most L tokens.
# TRL runs with T torch/OpenMP threads (default 2); ours uses every core (rayon's default)
# unless --threads is given, which then sets RAYON_NUM_THREADS=T for ours too.
# Environment: TRL_VENV (default /tmp/palm-trl-venv, created or completed here: torch,
# trl==TRL_VERSION (1.16.0), peft, gguf; needs PyPI the first time), SMOLLM2 (the GGUF),
# PALM (the binary; default target/release/palm, built with cargo only if missing).
set -euo pipefail
cd "$(dirname "$0")/.."

steps=4 batch=4 group=4 new_tokens=32 threads=2 threads_given=0
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2; shift 2 ;;
    --batch-size) batch=$2; shift 2 ;;
    --group-size) group=$2; shift 2 ;;
    --max-new-tokens) new_tokens=$2; shift 2 ;;
    --threads) threads=$2; threads_given=1; shift 2 ;;
    -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "bench-vs-trl.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ "$steps" -lt 2 ]; then
  echo "bench-vs-trl.sh: note: --steps $steps leaves no step after the warm-up; step 1 is reported" >&2
fi

SMOLLM2=${SMOLLM2:-../shared/data/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf}
PALM=${PALM:-target/release/palm}
venv="${TRL_VENV:-/tmp/palm-trl-venv}"
trl_version="${TRL_VERSION:-1.16.0}"
[ -f "$SMOLLM2" ] || { echo "bench-vs-trl.sh: no GGUF at $SMOLLM2 (set SMOLLM2)" >&2; exit 1; }

# --- the TRL venv (as scripts/trl-golden.sh, plus peft and gguf)
if [ ! -x "$venv/bin/python" ]; then
  echo "bench-vs-trl.sh: creating $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
fi
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
  "$venv/bin/pip" install --quiet torch
fi
if [ "$("$venv/bin/python" -c 'import trl; print(trl.__version__)' 2>/dev/null || true)" != "$trl_version" ]; then
  "$venv/bin/pip" install --quiet "trl==$trl_version"
fi
if ! "$venv/bin/python" -c 'import peft, gguf' 2>/dev/null; then
  "$venv/bin/pip" install --quiet peft gguf
fi

# --- our binary
if [ ! -x "$PALM" ]; then
  echo "bench-vs-trl.sh: building $PALM" >&2
  cargo build --release -p palm-cli >&2
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/palm-bench-vs-trl.XXXXXX")
trap 'rm -rf "$tmp"' EXIT

# --- ours
echo "bench-vs-trl.sh: palm rl: $steps steps of $batch prompts x $group completions, <= $new_tokens tokens" >&2
ours_env=()
if [ "$threads_given" = 1 ]; then ours_env=(RAYON_NUM_THREADS="$threads"); fi
env "${ours_env[@]}" "$PALM" rl --algorithm grpo --policy "$SMOLLM2" --task arithmetic:2 \
  --out "$tmp/palm-rl" --steps "$steps" --batch-size "$batch" --group-size "$group" \
  --max-new-tokens "$new_tokens" --lora-r 8 --seed 0 --train-prompts 64 --heldout 0 >&2
palm_version=$("$PALM" --version 2>/dev/null || echo unknown)
ours=$(python3 - "$tmp/palm-rl/metrics.jsonl" "$steps" "$batch" "$group" "$new_tokens" \
  "$([ "$threads_given" = 1 ] && echo "$threads" || nproc)" "$(basename "$SMOLLM2")" "$palm_version" <<'EOF'
import json, statistics, sys
path, steps, batch, group, new_tokens, threads, model, version = sys.argv[1:]
rows = [json.loads(l) for l in open(path) if l.strip()]
rows = [r for r in rows if "time/step_s" in r]
if not rows:
    sys.exit(f"bench-vs-trl.sh: no time/step_s in {path}")
timed = rows[1:] or rows
med = lambda k: round(statistics.median(r[k] for r in timed), 4) if all(k in r for r in timed) else None
print(json.dumps({
    "framework": "palm",
    "seconds_per_step": med("time/step_s"),
    "steps": len(timed),
    "step_seconds": [round(r["time/step_s"], 4) for r in rows],
    "rollout_s": med("time/rollout_s"),
    "update_s": med("time/update_s"),
    "mean_completion_length": [r.get("completions/mean_length") for r in rows],
    "reward": [r.get("reward") for r in rows],
    "settings": {"steps": int(steps), "batch_size": int(batch), "group_size": int(group),
                 "max_new_tokens": int(new_tokens), "threads": int(threads), "lora_r": 8,
                 "lora_alpha": 8, "lr": 1e-3, "beta": 0.04, "loss_type": "grpo",
                 "temperature": 1.0, "dtype": "float32", "model": model},
    "versions": {"palm": version.strip()},
}))
EOF
)
echo "$ours"

# --- TRL
echo "bench-vs-trl.sh: TRL GRPOTrainer ($threads threads)" >&2
theirs=$(OMP_NUM_THREADS="$threads" MKL_NUM_THREADS="$threads" "$venv/bin/python" scripts/bench_trl_grpo.py \
  --model "$SMOLLM2" --steps "$steps" --batch-size "$batch" --group-size "$group" \
  --max-new-tokens "$new_tokens" --threads "$threads" --train-prompts 64 --seed 0 | tail -n 1)
echo "$theirs"

python3 - "$ours" "$theirs" <<'EOF'
import json, sys
o, t = (json.loads(s)["seconds_per_step"] for s in sys.argv[1:])
print(json.dumps({"speedup": round(t / o, 3), "seconds_trl": t, "seconds_ours": o}))
EOF
