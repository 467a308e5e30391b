#!/usr/bin/env bash
# Trains the original palm-rlhf-pytorch 0.8.0 PaLM and ours from the same initial weights, on the
# same byte-level batches of tinyshakespeare, with the same optimiser (AdamW, clipping 0.5, warmup
# + cosine), and prints both validation curves. Passes when the final validation losses agree
# within 0.02 nats/byte.
#
# Needs python3 and network access to PyPI the first time (it creates .venv-compare/, ~4 GB with
# torch's CUDA wheels). Settings can be overridden: STEPS, BATCH, SEQ, LR, EVAL_EVERY, DATA.
set -euo pipefail
cd "$(dirname "$0")/.."

STEPS=${STEPS:-300}
BATCH=${BATCH:-16}
SEQ=${SEQ:-128}
LR=${LR:-2e-3}
EVAL_EVERY=${EVAL_EVERY:-50}
SHARED=${PALM_SHARED_DIR:-../shared}
DATA=${DATA:-$SHARED/data/corpora/tinyshakespeare.txt}
RUN=runs/compare-train
VENV=.venv-compare

if [ ! -f "$DATA" ]; then
  echo "compare-train: $DATA not found (set PALM_SHARED_DIR or DATA)" >&2
  exit 1
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet palm-rlhf-pytorch==0.8.0 torch safetensors numpy
fi

cargo build --quiet -p palm-cli
mkdir -p runs
rm -rf "$RUN"
cfg=runs/compare-train-config.json
cat > "$cfg" <<JSON
{"dim": 128, "num_tokens": 256, "depth": 2, "heads": 4, "dim_head": 32, "max_seq_len": 512}
JSON

start=$(date +%s)
target/debug/palm train --quiet --data "$DATA" --out "$RUN" --config "$cfg" \
  --steps "$STEPS" --batch-size "$BATCH" --seq-len "$SEQ" --lr "$LR" --warmup 30 \
  --eval-every "$EVAL_EVERY" --eval-batches 8 --sample-every 0 --save-every 0 --seed 0 \
  --export-batches > "$RUN.summary.json"
echo "ours trained $STEPS steps in $(( $(date +%s) - start ))s"
"$VENV/bin/python" scripts/compare_train.py "$RUN"
