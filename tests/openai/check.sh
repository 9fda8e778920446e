#!/usr/bin/env bash
# The OpenAI-compatible HTTP API against the official `openai` Python client (from PyPI), as a real
# external client: starts `ensemble up` on the bundled models with an API key, runs client.py, stops.
# Needs the release build (`cargo build --release --workspace`), python3 and PyPI on the first run.
#   bash tests/openai/check.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

venv="${OPENAI_CHECK_VENV:-target/openai-venv}"
req=tests/openai/requirements.txt
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! cmp -s "$req" "$venv/requirements.installed"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.installed"
fi

work=$(mktemp -d)
key="sk-ensemble-check-$RANDOM$RANDOM"
echo "$key" > "$work/api-keys"
port=${OPENAI_CHECK_PORT:-18080}
# deploy/local.toml with absolute model paths, an HTTP port and the key file.
sed -e "s|\"\.\./models/|\"$PWD/models/|" \
    -e "s|^http_listen = .*|http_listen = \"127.0.0.1:$port\"\napi_key_file = \"$work/api-keys\"|" \
    deploy/local.toml > "$work/cluster.toml"
./target/release/ensemble up --config "$work/cluster.toml" > "$work/up.log" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null || true; wait $up 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  if "$venv/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$port/health', timeout=2)" 2>/dev/null; then
    break
  fi
  if ! kill -0 $up 2>/dev/null; then cat "$work/up.log"; echo "ensemble up exited" >&2; exit 1; fi
  sleep 0.5
done
ENSEMBLE_HTTP="http://127.0.0.1:$port" ENSEMBLE_KEY="$key" "$venv/bin/python" tests/openai/client.py
if grep -q "$key" "$work/up.log"; then echo "the API key appears in the cluster's log" >&2; exit 1; fi
