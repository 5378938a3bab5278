#!/usr/bin/env bash
# CUDA misses copied straight from the registered shard mappings (`--staging registered`, what
# `auto` picks here) against pinned write-combined staging (`--staging write-combined`), alternated
# in one call on the GLM-4.7-Flash shape (experiments/configs/glm47-flash.json, MLX 4-bit
# `harness synth`, random weights, shards in the page cache): 8 layers twice each, 47 layers once
# each, LRU and lookahead at CAPACITIES slots; then HF transformers eager at 47 layers (the floor).
# Needs ./harness or .gpu/harness.xz (scripts/gpu_binary.sh). Prefix `SKIP_CHECK=1` to skip the
# `scripts/gpu_check.py` run that comes first. Writes more than 8 files: run it through
# scripts/gpu_call.sh on the lent machine.
# Usage: bash scripts/gpu_staging.sh OUTDIR [CAPACITIES]
set -u
out=${1:-/tmp/gpu_staging}; caps=${2:-16,32,64}
mkdir -p "$out"
source scripts/gpu_binary.sh
H=$PWD/harness; cfg=experiments/configs/glm47-flash.json
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; df -hT /tmp | tail -1; free -g | head -2; uname -r; } > "$out/gpu.txt" 2>&1
[ "${SKIP_CHECK:-0}" = 1 ] || { timeout 240 python3 scripts/gpu_check.py ./harness cuda > "$out/check.txt" 2>&1; echo "check exit $?" >> "$out/check.txt"; }
[ -d /tmp/flash8 ] || $H synth --config $cfg --layout mlx4 --out /tmp/flash8 --layers 8 >> "$out/gpu.txt" 2>&1
for i in 1 2; do
  for st in registered write-combined; do
    timeout 60 $H bench --model /tmp/flash8 --device cuda --policy lru,lookahead --capacity "$caps" --staging $st \
      --prompts 3 --tokens 16 --json "$out/b8_${st}_$i.json" > "$out/b8_${st}_$i.txt" 2>&1
  done
done
[ -d /tmp/flash47 ] || $H synth --config $cfg --layout mlx4 --out /tmp/flash47 >> "$out/gpu.txt" 2>&1
for st in registered write-combined; do
  timeout 120 $H bench --model /tmp/flash47 --device cuda --policy lru,lookahead --capacity "$caps" --staging $st \
    --prompts 3 --tokens 16 --json "$out/b47_$st.json" > "$out/b47_$st.txt" 2>&1
done
timeout 90 python3 scripts/hf_decode_baseline.py $cfg --tokens 16 > "$out/hf47.json" 2> "$out/hf47.err"
exit 0
