#!/usr/bin/env bash
# model-node beside llama.cpp on the same weights (not part of CI; an optional dependency):
# installs llama-cpp-python from PyPI (built from source, ~15 min on 2 cores the first time) into
# target/llamacpp-venv, writes the bench models as GGUF with `model-node convert`, and prints decode
# tokens/s at batch 1 (greedy, from BOS, 2 threads each) with the ratio, medians of interleaved rounds.
#   bash tests/bench/llamacpp.sh [ROUNDS] [TOKENS]      (default 5 rounds of 200 tokens)
# Models: stories260K (../shared/real, when present), random Llamas of ~25M and ~150M parameters.
# With an NVIDIA GPU (nvidia-smi answers) the same rounds also run on it: the node built with
# `--features cuda` on `--device cuda:0`, llama.cpp built with CUDA and every layer offloaded, in a
# venv of its own (target/llamacpp-venv-cuda). Without one the script says so and skips those rows.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
venv="${LLAMACPP_VENV:-target/llamacpp-venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
if ! "$venv/bin/python" -c 'import llama_cpp, numpy' 2> /dev/null; then
  echo "== building llama-cpp-python from PyPI (about 15 minutes on 2 cores)"
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=ON}" "$venv/bin/pip" install --quiet llama-cpp-python numpy
fi
cargo build --release -p model-node --bins --quiet
"$venv/bin/python" tests/bench/llamacpp.py "${1:-5}" "${2:-200}"

if ! nvidia-smi -L > /dev/null 2>&1; then
  echo
  echo "GPU rows skipped: no NVIDIA GPU here (nvidia-smi does not answer)."
  exit 0
fi
echo
echo "== the same on the GPU: $(nvidia-smi -L | head -1)"
gvenv="${LLAMACPP_CUDA_VENV:-target/llamacpp-venv-cuda}"
[ -x "$gvenv/bin/python" ] || python3 -m venv "$gvenv"
if ! "$gvenv/bin/python" -c 'import llama_cpp, numpy' 2> /dev/null; then
  echo "== building llama-cpp-python with CUDA from PyPI"
  CMAKE_ARGS="-DGGML_CUDA=on" "$gvenv/bin/pip" install --quiet llama-cpp-python numpy
fi
# A separate target directory keeps the CPU build (which the rows above used) intact.
CARGO_TARGET_DIR=target/cuda cargo build --release -p model-node --bins --features cuda --quiet
BENCH_DEVICE=cuda:0 BENCH_BIN=target/cuda/release/model-node \
  exec "$gvenv/bin/python" tests/bench/llamacpp.py "${1:-5}" "${2:-200}"
