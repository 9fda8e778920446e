#!/usr/bin/env bash
# Peak memory under a burst of oversized prompts, from outside: starts `ensemble up` on the bundled
# models, sends BURST concurrent chat requests whose prompt is 3 MB (over max_message_bytes, under the
# 4 MiB body limit) over HTTP, times a normal request sent during the burst, and prints each process's
# RSS before and its peak (VmHWM) after. Prints a table; asserts only that every oversized prompt was
# refused with 400 and the normal request answered.
#   bash tests/grpc/burst.sh [BURST]      (default 64)
# Needs the release build and python3.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
burst=${1:-64}
work=$(mktemp -d)
port=${BURST_CHECK_PORT:-18092}
sed -e "s|\"\.\./models/|\"$PWD/models/|" \
    -e "s|^http_listen = .*|http_listen = \"127.0.0.1:$port\"|" \
    -e "s|^listen = .*|listen = \"127.0.0.1:$((port + 1))\"|" \
    -e "s|127.0.0.1:5006|127.0.0.1:${BURST_NODE_PORTS:-1819}|" \
    deploy/local.toml > "$work/cluster.toml"
./target/release/ensemble up --config "$work/cluster.toml" > "$work/up.log" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null || true; wait $up 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
  if python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/ready', timeout=2)" 2>/dev/null; then
    break
  fi
  if ! kill -0 $up 2>/dev/null; then cat "$work/up.log"; echo "ensemble up exited" >&2; exit 1; fi
  sleep 0.5
done
python3 tests/grpc/burst.py "http://127.0.0.1:$port" "$up" "$burst"
