#!/usr/bin/env bash
# Runs the engine's CUDA kernels (the NVRTC sources embedded in the Rust code) on the CPU under
# HIP-CPU, against f64 references built from the same packed matrices: a numerics check of a
# kernel change for when no GPU is at hand. It is not a speed measurement, and not a substitute
# for scripts/gpu_check.py on the GPU (HIP-CPU runs a block's threads as fibers: memory-model and
# timing bugs pass here).
# Needs: g++ (C++17), libtbb-dev (Debian package), and a checkout of HIP-CPU
# (https://github.com/ROCm/HIP-CPU, header-only) at $HIPCPU (default ../HIP-CPU).
# Usage: bash scripts/kernel_emu/run.sh      Exit status 0 when every case is within tolerance.
# HIP-CPU's quirks, worked around: its warps are 64 wide and its shuffles synchronise the whole
# block, so the shuffles are used at width 64 (only lane 0 of each 32 reads a reduction, as the
# kernels do) and every case runs in a process of its own (state leaks between launches).
set -u
here=$(cd "$(dirname "$0")" && pwd)
hip=${HIPCPU:-$here/../../../HIP-CPU}
[ -f "$hip/include/hip/hip_runtime.h" ] || { echo "kernel_emu: HIP-CPU not found at $hip (set HIPCPU)" >&2; exit 1; }
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
python3 "$here/gen.py" "$build" || exit 1
fail=0
for t in matrix fused mla argmax fill; do
  g++ -std=c++17 -O2 -w -I"$hip/include" -I"$here" -I"$build" "$here/t_$t.cpp" -o "$build/t_$t" -ltbb -pthread || { echo "kernel_emu: $t does not compile" >&2; exit 1; }
  i=0
  while true; do
    "$build/t_$t" "$i"; rc=$?
    [ $rc = 2 ] && break
    [ $rc = 0 ] || fail=1
    i=$((i + 1))
  done
done
[ $fail = 0 ] && echo "kernel_emu: all cases within tolerance" || echo "kernel_emu: FAILED"
exit $fail
