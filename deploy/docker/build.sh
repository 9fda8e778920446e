#!/usr/bin/env bash
# Builds the CPU images from release binaries:
#   bash deploy/docker/build.sh [TAG]     # -> ensemble-model-node:TAG, ensemble-coordinator:TAG (TAG: dev)
# 1. the binaries: `cargo build --release` on this machine (incremental), or, with
#    RUST_IMAGE=rust:1.95-bookworm (needs a registry), inside that image so that they link against its
#    glibc whatever the host runs;
# 2. the base: BASE_IMAGE if given (e.g. debian:bookworm-slim from a registry), else ensemble-base:bookworm,
#    made here by deploy/docker/base-image.sh (debootstrap, cached);
# 3. each image from its Dockerfile with a build context holding only its (stripped) binary.
# Works with Docker's classic builder and with BuildKit. Prints the image sizes.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
tag=${1:-dev}
prefix=${IMAGE_PREFIX:-ensemble-}

if [ -n "${RUST_IMAGE:-}" ]; then
  echo "== cargo build --release inside $RUST_IMAGE"
  docker run --rm -v "$PWD":/src -w /src -e CARGO_TARGET_DIR=/src/target/docker-build \
    -v ensemble-cargo-registry:/usr/local/cargo/registry "$RUST_IMAGE" \
    cargo build --release --locked --workspace --bins
  bins=target/docker-build/release
else
  echo "== cargo build --release --workspace --bins"
  cargo build --release --locked --workspace --bins --quiet
  bins=target/release
fi

if [ -z "${BASE_IMAGE:-}" ]; then
  bash deploy/docker/base-image.sh
  base=${ENSEMBLE_BASE_IMAGE:-ensemble-base:bookworm}
else
  base=$BASE_IMAGE
fi

for app in model-node coordinator; do
  ctx=target/docker-context/$app
  rm -rf "$ctx" && mkdir -p "$ctx"
  # Symbols are for debuggers, not for a server image (a third of the file).
  strip -o "$ctx/$app" "$bins/$app"
  echo "== $prefix$app:$tag from $base"
  # (The classic builder's notice that BuildKit is missing goes to the log; shown only on failure.)
  docker build --quiet --build-arg BASE_IMAGE="$base" -f "deploy/docker/$app.Dockerfile" \
    -t "$prefix$app:$tag" "$ctx" > "$ctx.log" 2>&1 || { cat "$ctx.log" >&2; exit 1; }
done
echo
printf '%-32s %10s\n' IMAGE SIZE
for img in "$base" "${prefix}model-node:$tag" "${prefix}coordinator:$tag"; do
  printf '%-32s %7d MB\n' "$img" "$(($(docker image inspect "$img" --format '{{ .Size }}') / 1000000))"
done
