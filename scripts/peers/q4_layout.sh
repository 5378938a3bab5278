#!/usr/bin/env bash
# Builds and runs scripts/peers/q4_layout_bench.c (what an 8-row interleaved layout is worth to the
# 4-bit × int8 kernels on this CPU, one and two int8 parts, in cache and streamed from memory);
# prints a markdown table. Needs a C compiler and an x86-64 CPU with AVX2 + FMA.
# Usage: bash scripts/peers/q4_layout.sh [ROUNDS]   (default 3)
set -euo pipefail
cd "$(dirname "$0")"
grep -qw avx2 /proc/cpuinfo || { echo "q4_layout: this CPU has no AVX2" >&2; exit 1; }
bin=$(mktemp -d)/q4_layout_bench
cc -O2 -o "$bin" q4_layout_bench.c
grep -m1 "model name" /proc/cpuinfo
"$bin" "${1:-3}"
