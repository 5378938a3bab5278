#!/usr/bin/env bash
# Issue 20's CPU peers on the GPU machine's 16-core host, the GPU hidden from both: llama.cpp's
# llama-bench on a Q4_0 of the CPU-bench shape made by its own converter and quantizer (repacked at
# load as by default, and with `--repack 0`), and `harness bench --device cpu` (KINDS, default
# exact and int8x2) on the MLX 4-bit synth of the same config, at 1 / 2 / 4 / 8 / 16 threads, in
# rounds (ROUNDS, default 2). llama.cpp: the CPU pack .gpu/llama-cpu.tar.xz where present
# (scripts/peers/pack_llama_cpu.sh: AVX-512 with VNNI, as harness's int8 kernels use there), else
# the CPU backend of the CUDA pack .gpu/llama-cuda.tar.xz (AVX2 only). Needs ./harness or
# .gpu/harness.xz (scripts/gpu_binary.sh; a CPU-only build will do).
# Usage (device call): bash scripts/gpu_call.sh NAME scripts/gpu_cpu_peers.sh   (or OUTDIR as $1)
set -u
O=${1:-/tmp/gpu_cpu_peers}; mkdir -p "$O"
t0=$(date +%s)
source scripts/gpu_binary.sh
pack=.gpu/llama-cpu.tar.xz; [ -f $pack ] || pack=.gpu/llama-cuda.tar.xz
L=/tmp/llama-peer; mkdir -p $L && tar -xJf $pack -C $L
export LD_LIBRARY_PATH=$L/bin:$LD_LIBRARY_PATH
cfg=experiments/configs/glm4-moe-cpu-bench.json
{ lscpu; nproc; } > "$O/cpu.txt" 2>&1
./harness synth --config $cfg --layout mlx4 --out /tmp/cb4 >> "$O/log.txt" 2>&1
./harness synth --config $cfg --layout bf16 --out /tmp/cbbf >> "$O/log.txt" 2>&1
python3 scripts/peers/gguf_convert.py $L /tmp/cbbf /tmp/cb-bf16.gguf > "$O/convert.log" 2>&1
$L/bin/llama-quantize /tmp/cb-bf16.gguf /tmp/cb-q4_0.gguf Q4_0 > "$O/quant.log" 2>&1
echo "prepared $(( $(date +%s) - t0 )) s" >> "$O/log.txt"
# Rounds, every engine once per round in turn (as scripts/cpu_peers.sh: a host's speed drifts
# between minutes); the table (scripts/peers/table.py) gives medians and per-round ratios.
THREADS=${THREADS:-"1 2 4 8 16"}
{ lscpu | grep -m1 "Model name"; echo "cores: $(nproc)"; echo "llama.cpp from $pack"; echo "$(./harness --version 2>/dev/null), binary sha256 $(sha256sum harness | cut -c1-16)"; date -u; } > "$O/machine.txt"
for r in $(seq "${ROUNDS:-2}"); do
  CUDA_VISIBLE_DEVICES= timeout 300 $L/bin/llama-bench -m /tmp/cb-q4_0.gguf -ngl 0 -t "${THREADS// /,}" -p 16 -n 64 -r 1 \
    -o json > "$O/llama_Q4_0_r$r.json" 2> "$O/llama_r$r.log"
  CUDA_VISIBLE_DEVICES= timeout 300 $L/bin/llama-bench -m /tmp/cb-q4_0.gguf -ngl 0 -t "${THREADS// /,}" -p 16 -n 64 -r 1 \
    --repack 0 -o json > "$O/llama_Q4_0-norepack_r$r.json" 2> "$O/llama_norepack_r$r.log"
  for T in $THREADS; do
    for k in ${KINDS:-exact int8x2}; do
      CUDA_VISIBLE_DEVICES= timeout 60 ./harness bench --model /tmp/cb4 --device cpu --policy lru --capacity 64 --prompts 3 \
        --prompt-len 16 --tokens 64 --threads $T --kernels $k --json "$O/harness_t${T}_${k}_r$r.json" > "$O/harness_t${T}_${k}_r$r.txt" 2>&1
    done
  done
done
# PROFILE_THREADS (e.g. "16 8"): then one `--profile` run of each KINDS' first kind at those
# thread counts (ms a token by part, and what of it ran in the parallel regions).
for T in ${PROFILE_THREADS:-}; do
  k=${KINDS:-exact int8x2}; k=${k%% *}
  CUDA_VISIBLE_DEVICES= timeout 100 ./harness bench --model /tmp/cb4 --device cpu --policy lru --capacity 64 --prompts 6 \
    --prompt-len 16 --tokens 16 --threads "$T" --kernels "$k" --profile > "$O/profile_t$T.txt" 2>&1
done
python3 scripts/peers/table.py "$O" > "$O/table.md" 2>> "$O/log.txt"
echo "done $(( $(date +%s) - t0 )) s" >> "$O/log.txt"
exit 0
