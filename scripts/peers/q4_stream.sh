#!/usr/bin/env bash
# Builds and runs scripts/peers/q4_stream_bench.c: harness's int8x2 row kernel on 256 KB matrices
# read in random order (a decode step's experts) and in cache, with 2 / 4 / 8 KB prefetch, one
# int8 part, two matrices side by side, and the plain-read floor; prints a markdown table.
# Needs a C compiler and an x86-64 CPU with AVX2 + FMA (VNNI used where present); ~1 minute.
# Usage: bash scripts/peers/q4_stream.sh
set -euo pipefail
cd "$(dirname "$0")"
bin=$(mktemp -d)/q4_stream_bench
cc -O2 -o "$bin" q4_stream_bench.c
grep -m1 "model name" /proc/cpuinfo
echo "| working set | kernel | ns per row × 64 columns | ÷ two parts, 2 KB (time) |"
echo "|---|---|---|---|"
"$bin"
