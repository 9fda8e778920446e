#!/usr/bin/env bash
# Offline checks of deploy/: Dockerfiles, the Helm chart rendered and validated against the Kubernetes
# schemas, the generated coordinator config, compose.yaml. Needs python3 (3.11+) and access to PyPI
# for the first run; no cluster, no docker daemon, no helm binary. Run from anywhere:
#   bash deploy/check.sh
#   bash deploy/check.sh --images ensemble-model-node:dev,ensemble-coordinator:dev   # built images vs the chart
# The venv lives in target/deploy-check-venv (DEPLOY_CHECK_VENV overrides), reused while
# deploy/tools/requirements.txt is unchanged.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

venv="${DEPLOY_CHECK_VENV:-target/deploy-check-venv}"
req=deploy/tools/requirements.txt

if ! python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "deploy/check.sh: python3 >= 3.11 is needed (tomllib); found $(python3 --version 2>&1)" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "== creating $venv"
  python3 -m venv "$venv" || {
    echo "deploy/check.sh: 'python3 -m venv' failed (Debian: apt-get install python3-venv)" >&2
    exit 1
  }
fi
if ! cmp -s "$req" "$venv/requirements.installed"; then
  echo "== installing $req into $venv"
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.installed"
fi

PYTHONDONTWRITEBYTECODE=1 exec "$venv/bin/python" deploy/tools/check.py "$@"
