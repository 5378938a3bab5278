#!/usr/bin/env bash
# The miss modes on the GPU machine (issue 15; see docs/performance.md), with the CUDA binary at
# ./harness, .gpu/harness.xz or .gpu/harness.gz (built here with `source ../shared/tools/cuda-env.sh
# && cargo build --release --features cuda`):
#   1. experiments/literature-cuda.toml: the shipped model on CUDA, lru/mrs/eam-4 × 8/16 slots ×
#      load, cpu-compute, skip, substitute, low-bit (KL and top-1 against the exact model);
#   2. cpu-compute against load at real expert sizes: a GLM-4.7-Flash-shaped MLX 4-bit checkpoint
#      (`harness synth`, first LAYERS decoder layers) and `harness bench --miss load|cpu-compute`.
# Usage: bash scripts/gpu_literature.sh OUTDIR [LAYERS] [CAPACITIES]
set -u
out=${1:-/tmp/gpu_literature}; layers=${2:-8}; caps=${3:-16,32}
mkdir -p "$out"
source scripts/gpu_binary.sh
H=$PWD/harness
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; git rev-parse HEAD 2>/dev/null; } > "$out/gpu.txt" 2>&1
timeout 400 $H run experiments/literature-cuda.toml > "$out/literature.txt" 2>&1; echo "run exit $?" >> "$out/literature.txt"
for f in summary.json policies_and_miss_modes.md policies_and_miss_modes.png env.json; do
  cp results/literature-cuda/*/"$f" "$out/" 2>/dev/null
done
m=/tmp/flash$layers
[ -d "$m" ] || timeout 150 $H synth --config experiments/configs/glm47-flash.json --layout mlx4 --out "$m" --layers "$layers" >> "$out/gpu.txt" 2>&1
for miss in load cpu-compute; do
  timeout 200 $H bench --model "$m" --device cuda --policy lru --capacity "$caps" --no-resident \
    --prompts 2 --tokens 16 --miss "$miss" --json "$out/bench_$miss.json" > "$out/bench_$miss.txt" 2>&1
  echo "bench exit $?" >> "$out/bench_$miss.txt"
done
