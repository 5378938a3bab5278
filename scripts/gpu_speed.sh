#!/usr/bin/env bash
# Speed run on the GPU machine (see docs/performance.md): a GLM-4.7-Flash-shaped MLX 4-bit
# checkpoint (random weights, first 8 layers) through the engine on CUDA and on the CPU at several
# budgets, the default experiment (--quick) on CUDA, and the HF transformers eager baseline.
# Usage (on the GPU machine, with the CUDA binary at ./harness): bash scripts/gpu_speed.sh OUTDIR
set -u
out=${1:-/tmp/gpu_out}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
H=./harness
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$out/gpu.txt" 2>&1
nproc >> "$out/gpu.txt"
{ time $H synth --config experiments/configs/glm47-flash.json --layout mlx4 --out /tmp/flash8 --layers 8; } > "$out/synth.txt" 2>&1
toks=$(seq -s, 11 26)
for run in "cuda unlimited" "cuda 32" "cuda 16" "cuda 4" "cpu unlimited" "cpu 16"; do
  set -- $run
  args=(); [ "$2" != unlimited ] && args=(--capacity "$2")
  echo "== $1 capacity $2" >> "$out/engine.txt"
  { time timeout 80 $H generate --device "$1" --model /tmp/flash8 --tokens "$toks" --max-tokens 24 "${args[@]}"; } >> "$out/engine.txt" 2>&1
done
timeout 120 python3 scripts/hf_decode_baseline.py experiments/configs/glm47-flash.json --layers 8 --tokens 24 > "$out/hf.json" 2> "$out/hf.err"
sed 's/backend = "cpu"/backend = "cuda"/' experiments/default.toml > experiments/default-cuda.toml
timeout 150 $H run experiments/default-cuda.toml --quick --out /tmp/res > "$out/default_cuda.txt" 2>&1
cp /tmp/res/default-cuda/*/summary.json "$out/default_cuda_summary.json" 2>/dev/null
rm -f experiments/default-cuda.toml
