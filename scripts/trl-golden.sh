#!/usr/bin/env bash
# Regenerates crates/palm/tests/data/trl_golden.json: golden values of RL losses
# (DPO family, GRPO/RLOO advantages and GRPO-family policy losses) computed by
# TRL's own trainer code (not re-implemented formulas), from a throwaway venv under /tmp.
# Torch comes from PyPI (CPU is enough; the wheel is large and the first run is slow).
# TRL_VERSION pins the reference version the committed JSON was made with.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${TRL_VENV:-/tmp/palm-trl-venv}"
trl_version="${TRL_VERSION:-1.16.0}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
fi
if ! "$venv/bin/python" -c 'import torch' 2>/dev/null; then
    "$venv/bin/pip" install --quiet torch
fi
if [ "$("$venv/bin/python" -c 'import trl; print(trl.__version__)' 2>/dev/null || true)" != "$trl_version" ]; then
    "$venv/bin/pip" install --quiet "trl==$trl_version"
fi
"$venv/bin/python" "$here/trl_golden.py" "$@"
