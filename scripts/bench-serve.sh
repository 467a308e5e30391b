#!/usr/bin/env bash
# A bounded load test of `palm serve` (scripts/bench_serve.py: N concurrent clients streaming
# chat completions for T seconds each; requests/s, tokens/s, p50/p95 latency and time to first
# token, errors), optionally against llama.cpp's server on the same GGUF.
#
#   scripts/bench-serve.sh --palm target/release/palm --model MODEL [options] [-- palm serve ARGS]
#       starts `palm serve --port 0 ARGS` (e.g. -- --max-batch 16) on a temporary SQLite
#       database with a user of its own, and stops it at exit;
#   scripts/bench-serve.sh --base-url http://127.0.0.1:8080/v1 --api-key TOKEN [options]
#       loads a running server.
#
# Options:
#   --clients "1 4 16"   concurrency levels        --duration 20   seconds per level
#   --max-tokens 64      per request               --temperature 0.7
#   --model-id ID        the API's model id (default: the first of /v1/models)
#   --out DIR            keep the JSON lines there (palm.jsonl, llama-cpp.jsonl, ratio.jsonl)
#   --llama-cpp          also start `python -m llama_cpp.server` on the GGUF (--model when it is
#                        a .gguf, else --llama-gguf FILE) from a virtual environment with
#                        llama-cpp-python[server] (LLAMA_VENV, default /tmp/palm-llama-cpp-venv;
#                        pip builds it from source: long, and it may fail, which is reported and
#                        skipped), run the same load on it, and print the ratio palm/llama.cpp.
#   --llama-args "..."   extra llama_cpp.server arguments (default: --interrupt_requests False
#                        --n_threads/--n_threads_batch `nproc`; e.g. "--n_ctx 4096")
#
# JSON lines go to stdout, tables to stderr. Needs only python3 for the load itself.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cd "$here/.."

palm="" model="" base_url="" api_key="" model_id="" out_dir=""
clients="1 4 16" duration=20 max_tokens=64 temperature=0.7
llama=0 llama_gguf="" llama_args=""
serve_args=()
while [ $# -gt 0 ]; do
  case $1 in
    --palm) palm=$2; shift 2 ;;
    --model) model=$2; shift 2 ;;
    --base-url) base_url=$2; shift 2 ;;
    --api-key) api_key=$2; shift 2 ;;
    --model-id) model_id=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --max-tokens) max_tokens=$2; shift 2 ;;
    --temperature) temperature=$2; shift 2 ;;
    --out) out_dir=$2; shift 2 ;;
    --llama-cpp) llama=1; shift ;;
    --llama-gguf) llama_gguf=$2; shift 2 ;;
    --llama-args) llama_args=$2; shift 2 ;;
    -h|--help) awk 'NR > 1 { if (!/^#/) exit; sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    --) shift; serve_args=("$@"); break ;;
    *) echo "error: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
if [ -n "$palm" ]; then
  [ -n "$model" ] || { echo "error: --palm needs --model" >&2; exit 2; }
  [ -z "$base_url" ] || { echo "error: give either --palm/--model or --base-url/--api-key" >&2; exit 2; }
elif [ -z "$base_url" ]; then
  echo "error: give --palm BIN --model M, or --base-url URL --api-key TOKEN (see --help)" >&2
  exit 2
fi
if [ "$llama" = 1 ] && [ -z "$llama_gguf" ]; then
  case $model in
    *.gguf) llama_gguf=$model ;;
    *) echo "error: --llama-cpp needs a GGUF: --model FILE.gguf or --llama-gguf FILE" >&2; exit 2 ;;
  esac
fi

tmp=$(mktemp -d "${TMPDIR:-/tmp}/palm-bench-XXXXXX")
out=${out_dir:-$tmp}
mkdir -p "$out"
LLAMA_PID=""
cleanup() {
  if [ -n "$LLAMA_PID" ] && kill -0 "$LLAMA_PID" 2>/dev/null; then
    kill -TERM "$LLAMA_PID" 2>/dev/null || true
    wait "$LLAMA_PID" 2>/dev/null || true
  fi
  if declare -F stop_palm_serve >/dev/null; then stop_palm_serve; fi
  rm -rf "$tmp"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

bench() { # LABEL BASE_URL API_KEY MODEL_ID OUT.jsonl
  local args=(--label "$1" --base-url "$2" --api-key "$3" --clients $clients --duration "$duration"
              --max-tokens "$max_tokens" --temperature "$temperature")
  [ -n "$4" ] && args+=(--model "$4")
  python3 "$here/bench_serve.py" "${args[@]}" | tee "$5"
}

# 1. palm serve.
if [ -n "$palm" ]; then
  # shellcheck source=scripts/palm-serve-lib.sh
  . "$here/palm-serve-lib.sh"
  start_palm_serve "$palm" "$model" ${serve_args[@]+"${serve_args[@]}"}
  base_url=$PALM_BASE_URL
  api_key=$PALM_API_KEY
fi
rc=0
bench palm "$base_url" "$api_key" "$model_id" "$out/palm.jsonl" || rc=$?
if [ -n "$palm" ]; then
  if [ "$rc" -ne 0 ]; then
    echo "--- last lines of the server log ---" >&2
    tail -n 20 "$PALM_WORK/serve.log" >&2 || true
  fi
  stop_palm_serve # frees the CPU for llama.cpp
fi
[ "$rc" -eq 0 ] || exit "$rc"

# 2. llama.cpp's server on the same GGUF, when asked.
[ "$llama" = 1 ] || exit 0
LVENV=${LLAMA_VENV:-/tmp/palm-llama-cpp-venv}
logs=${out_dir:-${TMPDIR:-/tmp}/palm-bench-logs}
mkdir -p "$logs"
if ! "$LVENV/bin/python" -c 'import llama_cpp.server' 2>/dev/null; then
  echo "installing llama-cpp-python[server] into $LVENV (pip builds llama.cpp with cmake: this can take a long time); log: $logs/llama-pip.log" >&2
  t0=$SECONDS
  if ! { python3 -m venv "$LVENV" && "$LVENV/bin/pip" install 'llama-cpp-python[server]'; } >"$logs/llama-pip.log" 2>&1; then
    echo "llama.cpp comparison SKIPPED: installing llama-cpp-python[server] failed after $((SECONDS - t0))s; the end of $logs/llama-pip.log:" >&2
    tail -n 25 "$logs/llama-pip.log" >&2
    exit 0
  fi
  echo "installed llama-cpp-python in $((SECONDS - t0))s" >&2
fi
# Without --interrupt_requests False, each new request cuts the stream in progress; its
# default --n_threads is 1. Later --llama-args override these.
ncpu=$(nproc 2>/dev/null || echo 4)
llama_args="--interrupt_requests False --n_threads $ncpu --n_threads_batch $ncpu $llama_args"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
echo "starting: $LVENV/bin/python -m llama_cpp.server --model $llama_gguf --host 127.0.0.1 --port $port $llama_args" >&2
# shellcheck disable=SC2086
"$LVENV/bin/python" -m llama_cpp.server --model "$llama_gguf" --host 127.0.0.1 --port "$port" $llama_args \
  >"$logs/llama-server.log" 2>&1 &
LLAMA_PID=$!
t0=$SECONDS
until python3 -c "import urllib.request, sys; urllib.request.urlopen('http://127.0.0.1:$port/v1/models', timeout=2)" 2>/dev/null; do
  if ! kill -0 "$LLAMA_PID" 2>/dev/null || [ $((SECONDS - t0)) -ge "${LLAMA_TIMEOUT:-300}" ]; then
    echo "llama.cpp comparison SKIPPED: its server did not come up; the end of its log:" >&2
    tail -n 25 "$logs/llama-server.log" >&2
    exit 0
  fi
  sleep 1
done
echo "llama.cpp server (pid $LLAMA_PID) on http://127.0.0.1:$port after $((SECONDS - t0))s" >&2
if ! bench llama.cpp "http://127.0.0.1:$port/v1" "" "" "$out/llama-cpp.jsonl"; then
  echo "llama.cpp run FAILED; the end of its log:" >&2
  tail -n 25 "$logs/llama-server.log" >&2
  exit 1
fi

echo >&2
echo "== both ==" >&2
PYTHONDONTWRITEBYTECODE=1 python3 - "$here" "$out/palm.jsonl" "$out/llama-cpp.jsonl" <<'EOF' >&2
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_serve as b
print(b.HEADER)
for path in sys.argv[2:]:
    for line in open(path):
        print(b.row(json.loads(line)))
EOF
python3 "$here/bench_serve.py" --compare "$out/palm.jsonl" "$out/llama-cpp.jsonl" | tee "$out/ratio.jsonl"
