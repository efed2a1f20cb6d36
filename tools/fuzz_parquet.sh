#!/usr/bin/env bash
# Time-bounded libFuzzer run of tq's parquet reader (tests/fuzz/fuzz_parquet.cc) with ASan+UBSan,
# seeded with the pyarrow-written fixtures. Usage: tools/fuzz_parquet.sh [SECONDS=120] [JOBS=1]
# A crash leaves crash-* in build-fuzz/; turn it into a regression test in tests/risc/ (see
# RiscFuzzRegressions in tests/risc/test_parquet.cpp) and keep the input under tests/fixtures/risc/fuzz/.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-120}
jobs=${2:-1}
out=build-fuzz
mkdir -p "$out/corpus"
find tests/fixtures/risc/parquet -name '*.parquet' -size -64k -exec cp {} "$out/corpus/" \;
[[ -d tests/fixtures/risc/fuzz ]] && cp tests/fixtures/risc/fuzz/* "$out/corpus/" 2>/dev/null || true
clang++ -std=c++20 -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined \
  -Iinclude -Iapps -DTQ_HAVE_SNAPPY=1 -DTQ_HAVE_ZSTD=1 -DTQ_HAVE_ZLIB=1 \
  tests/fuzz/fuzz_parquet.cc -o "$out/fuzz_parquet" -lsnappy -lzstd -lz
cd "$out"
./fuzz_parquet corpus -max_total_time="$secs" -max_len=65536 -rss_limit_mb=2048 \
  -malloc_limit_mb=1024 -jobs="$jobs" -workers="$jobs" -print_final_stats=1 2>&1 | tail -25
