#!/usr/bin/env bash
# The README's test command: install what is missing, build the CPU configuration and run every
# test with ctest, then (when nvcc is present) compile the CUDA configuration. GPU tests run on
# the CPU build as skips; on a machine with a GPU the CUDA build's tests run too.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
jobs=${TQ_JOBS:-$(nproc)}

./tools/setup.sh

echo "== CPU build (build/)"
cmake -S . -B build -G Ninja -DTQ_CUDA=OFF -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build -j "$jobs"

echo "== tests (CPU)"
(cd build && ctest --output-on-failure -j "$jobs" --timeout 1500)

if command -v nvcc >/dev/null 2>&1 || [[ -x /usr/local/cuda/bin/nvcc ]]; then
  export PATH="$PATH:/usr/local/cuda/bin"
  echo "== CUDA build (build-cuda/, compile only unless a GPU is present)"
  cmake -S . -B build-cuda -G Ninja -DTQ_CUDA=ON -DCMAKE_BUILD_TYPE=Release >/dev/null
  cmake --build build-cuda -j "$jobs"
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "== tests (CUDA build, GPU present)"
    (cd build-cuda && ctest --output-on-failure -j 1 --timeout 1500)
  else
    echo "== no GPU here: CUDA build compiled, its GPU tests run on the device (tools/device_test.sh)"
  fi
fi
echo "== all tests passed"
