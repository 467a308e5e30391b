#!/usr/bin/env bash
# Checks `palm serve`'s OpenAI-compatible API with the official `openai` Python client, unchanged
# (scripts/openai_client.py: models, chat, streamed chat with usage, n=2, completions, errors).
#
#   scripts/openai-client.sh --palm target/release/palm --model MODEL [-- EXTRA palm serve ARGS]
#       starts `palm serve --port 0` on a temporary SQLite database with a user of its own
#       (`palm feedback user add`), runs the checks, and stops the server at exit;
#   scripts/openai-client.sh --base-url http://127.0.0.1:8080/v1 --api-key TOKEN
#       checks a running server.
#
# Other options go to openai_client.py: --model-id ID (default: the first of /v1/models),
# --max-tokens N (default 16), --timeout S. Creates its own virtual environment with `openai` the
# first time (PALM_VENV, default /tmp/palm-openai-venv; needs PyPI once). PALM_SERVE_TIMEOUT
# bounds the server's start (s, default 600); PALM_KEEP=1 keeps its log and database.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

palm="" model="" base_url="" api_key=""
py_args=() serve_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --palm) palm=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --base-url) base_url=$2; shift 2 ;;
    --api-key) api_key=$2; shift 2 ;;
    --model-id|--max-tokens|--timeout) py_args+=("$1" "$2"); shift 2 ;;
    -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    --) shift; serve_args=("$@"); break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$palm" ]; then
  [ -n "$model" ] || { echo "error: --palm needs --model" >&2; exit 2; }
  [ -z "$base_url" ] || { echo "error: give either --palm/--model or --base-url/--api-key" >&2; exit 2; }
elif [ -z "$base_url" ] || [ -z "$api_key" ]; then
  echo "error: give --palm BIN --model M, or --base-url URL --api-key TOKEN (see --help)" >&2
  exit 2
fi

VENV=${PALM_VENV:-/tmp/palm-openai-venv}
if ! "$VENV/bin/python" -c 'import openai' 2>/dev/null; then
  echo "creating $VENV with the openai client" >&2
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q openai
fi

if [ -n "$palm" ]; then
  # shellcheck source=scripts/palm-serve-lib.sh
  . "$here/palm-serve-lib.sh"
  trap stop_palm_serve EXIT
  trap 'exit 130' INT TERM
  start_palm_serve "$palm" "$model" ${serve_args[@]+"${serve_args[@]}"}
  base_url=$PALM_BASE_URL
  api_key=$PALM_API_KEY
fi

rc=0
"$VENV/bin/python" "$here/openai_client.py" --base-url "$base_url" --api-key "$api_key" \
  ${py_args[@]+"${py_args[@]}"} || rc=$?
if [ "$rc" -ne 0 ] && [ -n "$palm" ] && [ -n "${PALM_WORK:-}" ]; then
  echo "--- last lines of the server log ---" >&2
  tail -n 20 "$PALM_WORK/serve.log" >&2 || true
fi
exit "$rc"
