#!/usr/bin/env bash
# Regenerates crates/palm/tests/data/parquet/ with pyarrow from a throwaway venv under /tmp.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${PARQUET_VENV:-/tmp/palm-parquet-venv}"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet pyarrow
fi
"$venv/bin/python" "$here/make_parquet_fixtures.py" "$@"
