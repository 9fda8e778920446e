#!/usr/bin/env bash
# Real containers: builds the base image (debootstrap, cached) and the CPU images from the release
# binaries, brings up deploy/compose.yaml (three model nodes and the coordinator, each its own host on
# the project's private bridge network), checks the images against what the Helm chart expects, then
# injects faults across hosts (tests/containers/faults.py): docker kill / pause / network disconnect of
# a node, a rolling restart, two replicas behind DNS, the coordinator restarted and crashed.
#   bash tests/containers/run.sh [SCENARIO ...]      (default: all; see faults.py)
# Needs docker (no registry), root for debootstrap on the first run, python3 and PyPI on the first run.
# Removes every container, network and volume it created, whatever happens. Bounded: 20 minutes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
start=$SECONDS

venv="${CONTAINERS_VENV:-target/containers-venv}"
req=tests/containers/requirements.txt
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! cmp -s "$req" "$venv/requirements.installed"; then
  "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$req"
  cp "$req" "$venv/requirements.installed"
fi
if docker compose version > /dev/null 2>&1; then
  compose="docker compose"
else
  compose="$("$venv/bin/python" -c 'import compose, pathlib; print(pathlib.Path(compose.__file__).parent / "docker-compose")')"
fi
echo "== compose: $($compose version --short 2>/dev/null || echo "$compose")"

echo "== images (deploy/docker/build.sh)"
t=$SECONDS
bash deploy/docker/build.sh "${ENSEMBLE_TAG:-dev}"
echo "images ready in $((SECONDS - t)) s"

export ENSEMBLE_TAG=${ENSEMBLE_TAG:-dev}
export COMPOSE_PROJECT_NAME="ensemble-ci-$$"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
export ENSEMBLE_GRPC_PORT=${ENSEMBLE_GRPC_PORT:-$(free_port)}
export ENSEMBLE_HTTP_PORT=${ENSEMBLE_HTTP_PORT:-$(free_port)}
files="deploy/compose.yaml:tests/containers/compose.faults.yaml"
cargs=(-f deploy/compose.yaml -f tests/containers/compose.faults.yaml)
work=$(mktemp -d)
cleanup() {
  echo "== cleanup: project $COMPOSE_PROJECT_NAME"
  $compose "${cargs[@]}" logs --no-color > "$work/compose.log" 2>&1 || true
  if [ "${1:-0}" != 0 ]; then tail -n 60 "$work/compose.log" || true; fi
  # Unpause first: a paused container cannot be stopped.
  for c in $(docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME"); do
    docker unpause "$c" > /dev/null 2>&1 || true
  done
  $compose "${cargs[@]}" down --volumes --remove-orphans --timeout 5 > /dev/null 2>&1 || true
  docker ps -aq --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" | xargs -r docker rm -f > /dev/null
  docker network ls -q --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" | xargs -r docker network rm > /dev/null
  rm -rf "$work"
}
trap 'rc=$?; cleanup $rc; exit $rc' EXIT

echo "== compose up (project $COMPOSE_PROJECT_NAME, gRPC 127.0.0.1:$ENSEMBLE_GRPC_PORT, HTTP 127.0.0.1:$ENSEMBLE_HTTP_PORT)"
t=$SECONDS
$compose "${cargs[@]}" up -d --wait --wait-timeout 180
echo "cluster healthy in $((SECONDS - t)) s"
docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT_NAME" --format 'table {{.Names}}\t{{.Image}}\t{{.Status}}'

echo "== the images against the Helm chart (entrypoints, ports, probes, user)"
bash deploy/check.sh --images "ensemble-model-node:$ENSEMBLE_TAG,ensemble-coordinator:$ENSEMBLE_TAG"

"$venv/bin/python" -m grpc_tools.protoc -I proto/proto --python_out="$work" --grpc_python_out="$work" \
  proto/proto/ensemble/v1/node.proto proto/proto/ensemble/v1/ensemble.proto
echo "== faults across hosts"
PROJECT="$COMPOSE_PROJECT_NAME" COMPOSE="$compose" COMPOSE_FILES="$files" STUBS="$work" \
  GRPC_PORT="$ENSEMBLE_GRPC_PORT" HTTP_PORT="$ENSEMBLE_HTTP_PORT" DEADLINE_MS=3000 \
  timeout 1200 "$venv/bin/python" tests/containers/faults.py "$@"
echo "containers: passed in $((SECONDS - start)) s"
