#!/usr/bin/env bash
# The live trace page (GET /ui) in a real browser: Debian's Chromium, headless, driven by Selenium
# (PyPI) through Debian's chromedriver, against `ensemble up` on the bundled models with an API key.
# It asks arithmetic and atlas questions with SpecFuse and CharED, waits for each answer, and checks
# the coloured spans and the hover details against the gRPC trace of the same request (Python grpcio),
# then saves screenshots (in a temporary directory; UI_SHOTS=docs/ui refreshes the README's).
#   bash tests/ui/check.sh
#   UI_SHOTS=docs/ui bash tests/ui/check.sh
# Needs the release build, python3 (PyPI on the first run) and `chromium chromium-driver` from
# Debian's packages (.ci/run installs them).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

venv="${UI_CHECK_VENV:-target/ui-venv}"
req=tests/ui/requirements.txt
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! cmp -s "$req" "$venv/requirements.installed"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.installed"
fi
command -v chromium > /dev/null && command -v chromedriver > /dev/null || {
  echo "chromium and chromedriver are needed: apt-get install chromium chromium-driver" >&2
  exit 1
}

work=$(mktemp -d)
"$venv/bin/python" -m grpc_tools.protoc -I proto/proto --python_out="$work" --grpc_python_out="$work" \
  proto/proto/ensemble/v1/node.proto proto/proto/ensemble/v1/ensemble.proto
key="sk-ensemble-ui-$RANDOM$RANDOM"
echo "$key" > "$work/api-keys"
http=${UI_CHECK_PORT:-18085}
grpc=${UI_CHECK_GRPC_PORT:-18050}
sed -e "s|\"\.\./models/|\"$PWD/models/|" \
    -e "s|^listen = .*|listen = \"127.0.0.1:$grpc\"|" \
    -e "s|^http_listen = .*|http_listen = \"127.0.0.1:$http\"\napi_key_file = \"$work/api-keys\"|" \
    deploy/local.toml > "$work/cluster.toml"
./target/release/ensemble up --config "$work/cluster.toml" > "$work/up.log" 2>&1 &
up=$!
trap 'kill -TERM $up 2>/dev/null || true; wait $up 2>/dev/null || true; rm -rf "$work"' EXIT
for _ in $(seq 1 300); do
  if "$venv/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$http/ready', timeout=2)" 2>/dev/null; then
    break
  fi
  if ! kill -0 $up 2>/dev/null; then cat "$work/up.log"; echo "ensemble up exited" >&2; exit 1; fi
  sleep 0.5
done
shots="${UI_SHOTS:-$work/shots}"
mkdir -p "$shots"
STUBS="$work" ENSEMBLE_HTTP="http://127.0.0.1:$http" ENSEMBLE_GRPC="127.0.0.1:$grpc" ENSEMBLE_KEY="$key" \
  SHOTS="$shots" "$venv/bin/python" tests/ui/check.py
