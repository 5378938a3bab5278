#!/usr/bin/env bash
# Issue 20's CPU peers on the GPU machine's 16-core host, the GPU hidden from both: llama.cpp's
# llama-bench (the CPU backend of the CUDA pack .gpu/llama-cuda.tar.xz: AVX2, no AVX-512, as harness's
# kernels) on a Q4_0 of the CPU-bench shape made by its own converter and quantizer, and
# `harness bench --device cpu` (exact and int8x2) on the MLX 4-bit synth of the same config, at
# 1 / 4 / 16 threads. Needs ./harness or .gpu/harness.xz (scripts/gpu_binary.sh).
# Usage (device call): bash scripts/gpu_call.sh NAME scripts/gpu_cpu_peers.sh   (or OUTDIR as $1)
set -u
O=${1:-/tmp/gpu_cpu_peers}; mkdir -p "$O"
t0=$(date +%s)
source scripts/gpu_binary.sh
L=/tmp/llama-cuda; mkdir -p $L && tar -xJf .gpu/llama-cuda.tar.xz -C $L
export LD_LIBRARY_PATH=$L/bin:$LD_LIBRARY_PATH
cfg=experiments/configs/glm4-moe-cpu-bench.json
{ lscpu; nproc; } > "$O/cpu.txt" 2>&1
./harness synth --config $cfg --layout mlx4 --out /tmp/cb4 >> "$O/log.txt" 2>&1
./harness synth --config $cfg --layout bf16 --out /tmp/cbbf >> "$O/log.txt" 2>&1
python3 scripts/peers/gguf_convert.py $L /tmp/cbbf /tmp/cb-bf16.gguf > "$O/convert.log" 2>&1
$L/bin/llama-quantize /tmp/cb-bf16.gguf /tmp/cb-q4_0.gguf Q4_0 > "$O/quant.log" 2>&1
echo "prepared $(( $(date +%s) - t0 )) s" >> "$O/log.txt"
for T in 1 4 16; do
  CUDA_VISIBLE_DEVICES= timeout 90 $L/bin/llama-bench -m /tmp/cb-q4_0.gguf -ngl 0 -t $T -p 16 -n 64 -r 3 -o json > "$O/llama_t$T.json" 2> "$O/llama_t$T.log"
  for k in exact int8x2; do
    CUDA_VISIBLE_DEVICES= timeout 60 ./harness bench --model /tmp/cb4 --device cpu --policy lru --capacity 64 --prompts 3 \
      --prompt-len 16 --tokens 64 --threads $T --kernels $k --json "$O/h_t${T}_$k.json" > "$O/h_t${T}_$k.txt" 2>&1
  done
done
echo "done $(( $(date +%s) - t0 )) s" >> "$O/log.txt"
exit 0
