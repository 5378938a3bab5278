#!/usr/bin/env bash
# Issue 13's peers in one call on the GPU machine, on the first LAYERS decoder layers of the
# GLM-4.7-Flash shape (experiments/configs/glm47-flash.json, random weights, all weights resident):
#   * llama.cpp CUDA `llama-bench` (pp16, tg64, 3 repetitions, all layers on the GPU; three runs
#     alternated with harness's all-resident cell) on a Q4_0 GGUF
#     that llama.cpp's own converter (scripts/peers/gguf_convert.py) and quantizer made from the bf16
#     `harness synth` checkpoint of the same config; then with `--n-cpu-moe LAYERS` (every routed
#     expert in host memory, computed by the CPU: llama.cpp's offloading answer);
#   * harness bench on the MLX 4-bit `harness synth` checkpoint: all resident, then LRU and lookahead
#     at CAPACITIES slots per layer (page cache);
#   * HF transformers eager (bf16, scripts/hf_decode_baseline.py), the floor.
# Needs ./harness or .gpu/harness.xz (scripts/gpu_binary.sh) and llama.cpp's CUDA build packed as
# .gpu/llama-cuda.tar.xz: bin/ (llama-bench, llama-quantize, their shared libraries) plus the
# converter (convert_hf_to_gguf.py, conversion/, gguf-py/) of the same tree. Build notes in
# docs/performance.md. The GPU machine has no internet: nothing here downloads.
# Usage: [DEADLINE=seconds] [TOKENS=n] [PREP_ONLY=1] bash scripts/gpu_peers.sh OUTDIR [LAYERS] [CAPACITIES]
# TOKENS: harness's new tokens per prompt (default 16; 64 is llama-bench's tg64). PREP_ONLY: stop
# once the checkpoints are written (the whole model's preparation fills most of a device call).
# With DEADLINE, the steps after the alternated resident runs start only if they can finish in
# time (a device call's command is cut at 10 minutes; the whole model's preparation takes most of
# one, and what it wrote is reused by the next call while the machine is still held).
set -u
D=${DEADLINE:-100000}
T0=$(date +%s); left() { echo $(( D - ($(date +%s) - T0) )); }
out=${1:-/tmp/gpu_peers}; layers=${2:-8}; caps=${3:-16,32,64}
mkdir -p "$out"
source scripts/gpu_binary.sh
H=$PWD/harness
L=/tmp/llama-cuda
mkdir -p $L && tar -xJf .gpu/llama-cuda.tar.xz -C $L
export LD_LIBRARY_PATH=$L/bin:$LD_LIBRARY_PATH
cfg=experiments/configs/glm47-flash.json
m=/tmp/flash$layers; b=/tmp/flash$layers-bf16; g=/tmp/flash$layers
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; } > "$out/gpu.txt" 2>&1
t0=$(date +%s)
if [ ! -f "$g-q4_0.gguf" ]; then
  if [ "$layers" -le 16 ]; then
    $H synth --config $cfg --layout bf16 --out "$b" --layers "$layers" >> "$out/gpu.txt" 2>&1
    python3 scripts/peers/gguf_convert.py $L "$b" "$g-bf16.gguf" --no-mtp > "$out/convert.log" 2>&1
    rm -rf "$b"
    $L/bin/llama-quantize "$g-bf16.gguf" "$g-q4_0.gguf" Q4_0 > "$out/quantize.log" 2>&1
    rm -f "$g-bf16.gguf"
  else
    # The whole model: its bf16 checkpoint and the converter's bf16 GGUF are ~60 GB each, and the
    # GPU machine has a 64 GB disk and 128 GB of memory. The checkpoint goes to /dev/shm, the GGUF
    # to the disk; the checkpoint is dropped before llama-quantize writes Q4_0 (~17 GB) to
    # /dev/shm, then the bf16 GGUF is dropped before the MLX checkpoint is written.
    b=/dev/shm/flash$layers-bf16; q=/dev/shm/flash$layers-q4_0.gguf
    $H synth --config $cfg --layout bf16 --out "$b" --layers "$layers" >> "$out/gpu.txt" 2>&1
    echo "synth_bf16_s $(( $(date +%s) - t0 ))" >> "$out/gpu.txt"
    python3 scripts/peers/gguf_convert.py $L "$b" "$g-bf16.gguf" --no-mtp > "$out/convert.log" 2>&1
    echo "convert_s $(( $(date +%s) - t0 ))" >> "$out/gpu.txt"
    rm -rf "$b"
    $L/bin/llama-quantize "$g-bf16.gguf" "$q" Q4_0 > "$out/quantize.log" 2>&1
    rm -f "$g-bf16.gguf"
    ln -sf "$q" "$g-q4_0.gguf"
  fi
  df -h / /dev/shm >> "$out/gpu.txt" 2>&1
fi
[ -d "$m" ] || $H synth --config $cfg --layout mlx4 --out "$m" --layers "$layers" >> "$out/gpu.txt" 2>&1
echo "prepare_s $(( $(date +%s) - t0 ))" >> "$out/gpu.txt"
[ -n "${PREP_ONLY:-}" ] && exit 0
tokens=${TOKENS:-16}
# llama.cpp and harness all-resident, alternated three times (the host's speed drifts within a call).
for i in 1 2 3; do
  timeout 60 $L/bin/llama-bench -m "$g-q4_0.gguf" -ngl 99 -p 16 -n 64 -r 3 -o json > "$out/llama$i.json" 2> "$out/llama$i.log"
  timeout 60 $H bench --model "$m" --device cuda --policy lru --capacity 64 --prompts 3 --tokens "$tokens" \
    --json "$out/resident$i.json" > "$out/resident$i.txt" 2>&1
done
# Each later step runs only if it can finish before DEADLINE; a skipped one says so.
step() { # STEP NEEDS_SECONDS
  [ "$(left)" -gt "$2" ] && return 0
  echo "$1 skipped: $(left) s left before DEADLINE" >> "$out/skipped.txt"; return 1
}
step llama_cpumoe 170 && timeout 150 $L/bin/llama-bench -m "$g-q4_0.gguf" -ngl 99 -ncmoe "$layers" -p 16 -n 64 -r 3 -o json > "$out/llama_cpumoe.json" 2> "$out/llama_cpumoe.log"
if step bench 120; then
  timeout 200 $H bench --model "$m" --device cuda --policy lru,lookahead --capacity "$caps" \
    --prompts 3 --tokens "$tokens" --json "$out/bench.json" > "$out/bench.txt" 2>&1; echo "bench exit $?" >> "$out/bench.txt"
fi
step hf 100 && timeout 90 python3 scripts/hf_decode_baseline.py $cfg --layers "$layers" --tokens 16 > "$out/hf.json" 2> "$out/hf.err"
exit 0
