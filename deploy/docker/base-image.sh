#!/usr/bin/env bash
# The runtime base image, made from Debian's packages without any registry: a minimal Debian root
# filesystem (`debootstrap --variant=minbase`), trimmed of documentation and locales, then
# `docker import`ed under a local tag. The project's Dockerfiles take it as BASE_IMAGE; with a registry,
# `debian:bookworm-slim` (their default) is the same distribution.
#   bash deploy/docker/base-image.sh            # -> ensemble-base:bookworm
# Cached: when an image of that tag carries the recipe label of this script's content, nothing is
# rebuilt (ENSEMBLE_BASE_REBUILD=1 forces). Needs root, docker and debootstrap (installed from
# Debian's packages when missing). Environment: ENSEMBLE_BASE_IMAGE (tag), DEBIAN_MIRROR, DEBIAN_SUITE.
set -euo pipefail
tag=${ENSEMBLE_BASE_IMAGE:-ensemble-base:bookworm}
suite=${DEBIAN_SUITE:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
recipe=$( (cat "${BASH_SOURCE[0]}"; echo "$suite $mirror") | sha256sum | cut -c1-16)

have=$(docker image inspect "$tag" --format '{{ index .Config.Labels "org.ensemble.base.recipe" }}' 2>/dev/null || true)
if [ "$have" = "$recipe" ] && [ -z "${ENSEMBLE_BASE_REBUILD:-}" ]; then
  echo "base image $tag: up to date (recipe $recipe)"
  exit 0
fi
if ! command -v debootstrap > /dev/null; then
  echo "== installing debootstrap (Debian's packages)"
  apt-get update -q > /dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap > /dev/null
fi

root=$(mktemp -d /tmp/ensemble-base.XXXXXX)
trap 'rm -rf "$root"' EXIT
echo "== debootstrap --variant=minbase $suite from $mirror"
start=$SECONDS
debootstrap --variant=minbase "$suite" "$root" "$mirror" > "$root.log" 2>&1 || {
  tail -n 30 "$root.log" >&2
  rm -f "$root.log"
  exit 1
}
rm -f "$root.log"
# What a server image does not need: package lists and caches, documentation, manuals, translations.
rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/var/cache/apt/archives/*.deb \
  "$root"/var/cache/debconf/*-old "$root"/var/log/* "$root"/usr/share/doc/* "$root"/usr/share/man/* \
  "$root"/usr/share/info/* "$root"/usr/share/locale/* "$root"/usr/share/lintian "$root"/tmp/*
# debootstrap's machine-specific files: every container gets its own.
: > "$root/etc/machine-id"
rm -f "$root/etc/hostname" "$root/etc/resolv.conf"

tar --numeric-owner -C "$root" -c . | docker import \
  --change "LABEL org.ensemble.base.recipe=$recipe" \
  --change "LABEL org.opencontainers.image.title=\"ensemble base ($suite minbase)\"" \
  --change "LABEL org.opencontainers.image.description=\"debootstrap --variant=minbase $suite from $mirror\"" \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'CMD ["bash"]' \
  - "$tag" > /dev/null
size=$(docker image inspect "$tag" --format '{{ .Size }}')
echo "base image $tag: $((size / 1000000)) MB, built in $((SECONDS - start)) s (recipe $recipe)"
