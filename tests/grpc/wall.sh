#!/usr/bin/env bash
# An external client (Python grpcio from PyPI) against a real `model-node serve`: wall time per call
# against the node's compute time (prints a table; no timing assertion).
#   bash tests/grpc/wall.sh [MODEL_DIR] [CALLS] [STREAMS]
# (default: models/arith, 50 calls; STREAMS, e.g. 1,4,16, adds the concurrent-proposals table)
# Needs the release build and python3 (PyPI on the first run).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
model=${1:-models/arith}
calls=${2:-50}
streams=${3:-}
venv="${GRPC_CHECK_VENV:-target/grpc-venv}"
req=tests/grpc/requirements.txt
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! cmp -s "$req" "$venv/requirements.installed"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.installed"
fi
work=$(mktemp -d)
"$venv/bin/python" -m grpc_tools.protoc -I proto/proto --python_out="$work" --grpc_python_out="$work" \
  proto/proto/ensemble/v1/node.proto
port=${GRPC_CHECK_PORT:-18091}
./target/release/model-node serve --model-dir "$model" --listen "127.0.0.1:$port" --metrics-listen off \
  > "$work/node.log" 2>&1 &
node=$!
trap 'kill -TERM $node 2>/dev/null || true; wait $node 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 100); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
  if ! kill -0 $node 2>/dev/null; then cat "$work/node.log"; exit 1; fi
  sleep 0.2
done
STUBS="$work" "$venv/bin/python" tests/grpc/wall.py "127.0.0.1:$port" "$(basename "$model")" "$calls" "$streams"
