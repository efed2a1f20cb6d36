#!/usr/bin/env bash
# Builds the CUDA configuration for the lent H200 (sm_90a) on THIS machine and stages what the
# device needs in .dev/ (git-ignored): the stripped tq_tests / tq_bench / paligemma binaries and the
# non-system shared libraries they link (the device image has CUDA 13, but not sentencepiece's,
# libjpeg's, snappy's or Google Benchmark's Debian builds). Building here costs no device time;
# tools/device.sh runs the staged binaries there.
#
#   ./tools/device_build.sh          then, with the device tool:  run  "bash tools/device.sh"  carry [".dev"]
#   TQ_JOBS=N                        build parallelism (default: all cores)
#   TQ_TARGETS="tq_tests paligemma"  build only these (default: tq_tests tq_bench paligemma)
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/cuda/bin"
cmake -S . -B build-dev -G Ninja -DTQ_CUDA=ON -DTQ_CUDA_ARCHITECTURES=90a -DTQ_TEST_DIRS=cuda \
  -DCMAKE_BUILD_TYPE=Release >/dev/null
# TQ_TARGETS narrows the build (e.g. "tq_tests paligemma" after a change the benchmarks do not need;
# a target not rebuilt keeps its previous binary).
# shellcheck disable=SC2086
cmake --build build-dev -j "${TQ_JOBS:-$(nproc)}" --target ${TQ_TARGETS:-tq_tests tq_bench paligemma}
rm -rf .dev
mkdir -p .dev/bin .dev/lib
for b in tq_tests tq_bench paligemma; do  # a target never built (TQ_TARGETS) is left out
  if [[ -f build-dev/bin/$b ]]; then cp build-dev/bin/$b .dev/bin/; fi
done
strip .dev/bin/*
for lib in $(ldd .dev/bin/* | awk '/=> \// {print $3}' | sort -u); do
  case $(basename "$lib") in
    libc.so*|libm.so*|libgcc_s*|libstdc++*|libpthread*|libdl.so*|librt.so*|ld-linux*|libz.so*) ;;  # the system's
    libcuda.so*|libcudart*|libcublas*|libnccl*) ;;                                                   # the device's CUDA 13
    *) cp -L "$lib" .dev/lib/ ;;
  esac
done
# The binaries carry this checkout's absolute paths (fixtures, sample data, their own folder):
# tools/device.sh links that path to its own checkout on the device.
pwd >.dev/SOURCE_DIR
git rev-parse --short HEAD >.dev/COMMIT
if [[ -n $(git status --porcelain --untracked-files=no) ]]; then echo "+dirty" >>.dev/COMMIT; fi
du -sh .dev/bin/* .dev/lib
