#!/usr/bin/env bash
# Runs every fuzz target (proptest-driven soaks, see model-node/tests/fuzz.rs and
# coordinator/tests/fuzz.rs) for SECONDS each (default 60) and prints one line per target:
#   bash tests/fuzz/run.sh 600    # the 10-minute run reported in the README
# A crash fails the run and prints the input that caused it.
set -euo pipefail
cd "$(dirname "$0")/../.."
secs=${1:-60}
export FUZZ_SECONDS=$secs
for spec in model-node:node_requests model-node:chat_templates model-node:char_marginals \
    coordinator:generate_requests coordinator:http_bodies; do
  IFS=: read -r pkg target <<< "$spec"
  cargo test --release -q -p "$pkg" --test fuzz "$target" -- --exact --nocapture 2>&1 \
    | grep -E "^fuzz |panicked|crash" || { echo "fuzz $target: FAILED"; exit 1; }
done
