# Sourced by scripts/openai-client.sh and scripts/bench-serve.sh: start `palm serve` on a fresh
# SQLite database and stop it again.
#
#   start_palm_serve BIN MODEL [EXTRA palm serve ARGS...]
#     sets PALM_BASE_URL (http://127.0.0.1:PORT/v1), PALM_API_KEY (a new user's token),
#     PALM_PID, PALM_WORK (temp folder with db.sqlite and serve.log); fails with the log's tail
#     when the server exits or does not listen within PALM_SERVE_TIMEOUT seconds (default 600).
#   stop_palm_serve      kills it (SIGTERM, then SIGKILL) and removes PALM_WORK (kept when
#                        PALM_KEEP=1). Safe to call twice; meant for an EXIT trap.

PALM_PID=""
PALM_WORK=""

start_palm_serve() {
  local bin=$1 model=$2
  shift 2
  if [ ! -x "$bin" ]; then
    echo "error: --palm $bin is not an executable" >&2
    return 1
  fi
  PALM_WORK=$(mktemp -d "${TMPDIR:-/tmp}/palm-serve-XXXXXX")
  local db="sqlite://$PALM_WORK/db.sqlite"
  # A user of our own; with one on the database, `palm serve` creates no admin.
  if ! PALM_API_KEY=$("$bin" feedback user add client --db "$db" 2>"$PALM_WORK/user-add.log"); then
    echo "error: '$bin feedback user add client --db $db' failed:" >&2
    cat "$PALM_WORK/user-add.log" >&2
    return 1
  fi
  PALM_API_KEY=$(printf '%s' "$PALM_API_KEY" | tr -d '[:space:]')
  if [ -z "$PALM_API_KEY" ]; then
    echo "error: 'palm feedback user add' printed no token" >&2
    return 1
  fi
  echo "starting: $bin serve --model $model --db $db --port 0 $*" >&2
  "$bin" serve --model "$model" --db "$db" --port 0 "$@" >"$PALM_WORK/serve.log" 2>&1 &
  PALM_PID=$!
  local limit=${PALM_SERVE_TIMEOUT:-600} t0=$SECONDS url=""
  while :; do
    url=$(sed -n 's#.* on \(http://[^ ]*\).*#\1#p' "$PALM_WORK/serve.log" | head -n1)
    [ -n "$url" ] && break
    if ! kill -0 "$PALM_PID" 2>/dev/null; then
      local st=0
      wait "$PALM_PID" 2>/dev/null || st=$?
      echo "error: palm serve exited (status $st) before listening; its log ($PALM_WORK/serve.log):" >&2
      tail -n 30 "$PALM_WORK/serve.log" >&2
      PALM_PID=""
      return 1
    fi
    if [ $((SECONDS - t0)) -ge "$limit" ]; then
      echo "error: palm serve did not listen within ${limit}s (PALM_SERVE_TIMEOUT); its log:" >&2
      tail -n 30 "$PALM_WORK/serve.log" >&2
      return 1
    fi
    sleep 0.5
  done
  PALM_BASE_URL="${url%/}/v1"
  echo "palm serve (pid $PALM_PID) listening on $url after $((SECONDS - t0))s; log: $PALM_WORK/serve.log" >&2
}

stop_palm_serve() {
  if [ -n "$PALM_PID" ] && kill -0 "$PALM_PID" 2>/dev/null; then
    kill -TERM "$PALM_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 20); do
      kill -0 "$PALM_PID" 2>/dev/null || break
      sleep 0.25
    done
    if kill -0 "$PALM_PID" 2>/dev/null; then kill -KILL "$PALM_PID" 2>/dev/null || true; fi
    wait "$PALM_PID" 2>/dev/null || true
  fi
  PALM_PID=""
  if [ -n "$PALM_WORK" ] && [ -d "$PALM_WORK" ]; then
    if [ "${PALM_KEEP:-0}" = 1 ]; then
      echo "kept $PALM_WORK (server log and database)" >&2
    else
      rm -rf "$PALM_WORK"
    fi
  fi
  PALM_WORK=""
}
