#!/usr/bin/env bash
# Speed run on the GPU machine (see docs/performance.md). A GLM-4.7-Flash-shaped MLX 4-bit
# checkpoint (random weights, first 8 layers: 7 MoE layers × 64 experts of 5.3 MB) is swept over
# expert-slot budgets with `harness run` on CUDA (one warm-up prompt excluded, so the unlimited
# cell runs all-resident), once on the CPU for comparison; host→GPU bandwidth (pinned vs
# pageable) and the HF transformers eager baseline are measured in the same call.
# Usage (on the GPU machine, with the CUDA binary at ./harness): bash scripts/gpu_speed.sh OUTDIR
set -u
out=${1:-/tmp/gpu_out}; mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
H=$PWD/harness
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } > "$out/gpu.txt" 2>&1
python3 scripts/h2d_bandwidth.py >> "$out/gpu.txt" 2>&1
$H synth --config experiments/configs/glm47-flash.json --layout mlx4 --out /tmp/flash8 --layers 8 >> "$out/gpu.txt" 2>&1
mkdir -p /tmp/exp
for dev in cuda cpu; do
  cat > /tmp/exp/speed-$dev.toml <<TOML
name = "speed-$dev"
[model]
path = "/tmp/flash8"
backend = "$dev"
[cache]
policy = ["lru", "lookahead"]
capacity = [4, 16, 32, 64]
[prompts]
inline = ["warm up the cache with a first prompt", "def main(argv):", "The quick brown fox jumps over", "import numpy as np"]
warmup = 1
[generation]
max_new_tokens = 16
[output]
plots = false
TOML
  [ "$dev" = cpu ] && sed -i 's/policy = \["lru", "lookahead"\]/policy = "lru"/; s/capacity = \[4, 16, 32, 64\]/capacity = [16, 64]/' /tmp/exp/speed-$dev.toml
  timeout 280 $H run /tmp/exp/speed-$dev.toml --out /tmp/res > "$out/run_$dev.txt" 2>&1
  cp /tmp/res/speed-$dev/*/summary.json "$out/summary_$dev.json" 2>/dev/null
done
timeout 60 python3 scripts/hf_decode_baseline.py experiments/configs/glm47-flash.json --layers 8 --tokens 16 > "$out/hf.json" 2> "$out/hf.err"
sed 's/backend = "cpu"/backend = "cuda"/' experiments/default.toml > experiments/default-cuda.toml
timeout 60 $H run experiments/default-cuda.toml --quick --out /tmp/res > "$out/default_cuda.txt" 2>&1
rm -f experiments/default-cuda.toml
