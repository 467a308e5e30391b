#!/usr/bin/env bash
# Checks a GGUF file written by `palm` (palm::model::gguf_export::write_gguf) with llama.cpp's own
# Python reader (PyPI `gguf`): tensor names, shapes and types, and the architecture metadata; with
# `--like SRC.gguf` also that the tensor table and tokenizer metadata match the source file and
# that the dequantised weights agree with it.
#
#   scripts/check-gguf.sh OUT.gguf [--like SRC.gguf] [--tol 0.05]
#
# Creates its own virtual environment under /tmp the first time (needs PyPI access once).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-/tmp/palm-check-gguf-venv}
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "gguf>=0.10" numpy
fi
exec "$VENV/bin/python" scripts/check_gguf.py "$@"
