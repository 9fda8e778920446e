#!/usr/bin/env bash
# model-node beside llama.cpp on the same weights (not part of CI; an optional dependency):
# installs llama-cpp-python from PyPI (built from source, ~15 min on 2 cores the first time) into
# target/llamacpp-venv, writes the bench models as GGUF with `model-node convert`, and prints decode
# tokens/s at batch 1 (greedy, from BOS, 2 threads each) with the ratio, medians of interleaved rounds.
#   bash tests/bench/llamacpp.sh [ROUNDS] [TOKENS]      (default 5 rounds of 200 tokens)
# Models: stories260K (../shared/real, when present), random Llamas of ~25M and ~150M parameters.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
venv="${LLAMACPP_VENV:-target/llamacpp-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c 'import llama_cpp, numpy' 2> /dev/null; then
  echo "== building llama-cpp-python from PyPI (about 15 minutes on 2 cores)"
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$venv/bin/pip" install --quiet llama-cpp-python numpy
fi
cargo build --release -p model-node --bins --quiet
exec "$venv/bin/python" tests/bench/llamacpp.py "${1:-5}" "${2:-200}"
