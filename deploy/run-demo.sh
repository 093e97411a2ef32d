#!/usr/bin/env bash
# The main job: start gradserver, wait until its health service says SERVING, run the seed
# notebook's three demos through `gradctl demo` (each number is checked against PyTorch's), and
# stop the server with SIGTERM, which lets it drain and exit 0.
#
#   bash deploy/run-demo.sh [BUILD_DIR]        (default: build/)
#
# The server listens on a free loopback port; its request log is printed at the end.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
build="${1:-$root/build}"
server_bin="$build/server/gradserver"
gradctl="$build/client/gradctl"
for bin in "$server_bin" "$gradctl"; do
  [[ -x "$bin" ]] || { echo "run-demo: $bin is missing; build first" >&2; exit 1; }
done

log="$(mktemp)"
"$server_bin" --address=127.0.0.1:0 2>"$log" &
server_pid=$!
stop_server() {
  if kill -0 "$server_pid" 2>/dev/null; then
    kill -TERM "$server_pid"
    wait "$server_pid" || { echo "run-demo: gradserver exited with $?" >&2; return 1; }
  fi
}
trap 'stop_server || true; rm -f "$log"' EXIT

# The server prints "gradserver listening on HOST:PORT" once it is bound.
address=""
for _ in $(seq 200); do
  address="$(sed -n 's/^gradserver listening on //p' "$log" | head -n 1)"
  [[ -n "$address" ]] && break
  kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
  sleep 0.05
done
[[ -n "$address" ]] || { echo "run-demo: gradserver did not start" >&2; cat "$log" >&2; exit 1; }

"$gradctl" health --server="$address"
"$gradctl" demo all --server="$address"
stop_server
trap 'rm -f "$log"' EXIT
echo
echo "== gradserver log"
cat "$log"
