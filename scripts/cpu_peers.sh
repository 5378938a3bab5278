#!/usr/bin/env bash
# Issue 20's CPU peers, side by side from one run on this machine, on one shape
# (experiments/configs/glm4-moe-cpu-bench.json: glm4_moe, hidden 1024, 8 layers, 64 experts top-4 + 1
# shared, vocab 8192; random weights), all weights in memory, 16-token prompt, 64 new tokens:
#   * harness: `harness bench`'s all-resident row (prefill of 16-token prompts and decode, every expert
#     loaded before the measured prompts) on the MLX 4-bit `harness synth` checkpoint, at 1 and all
#     threads, the kernel kinds of KINDS (default: exact, int8x2, int8);
#   * llama.cpp: `llama-bench` (pp16, tg64) at the same thread counts on Q4_0 (repacked at load, as
#     by default, and with `--repack 0`) and Q4_1
#     GGUFs that llama.cpp's own converter and quantizer made from the bf16 `harness synth` checkpoint of
#     the same config (built here from the llama.cpp tree PyPI's llama-cpp-python sdist ships; AVX-512
#     and its VNNI / BF16 / VBMI extensions when the CPU has them, AMX off: a native build crashed in
#     the AMX matmul on an earlier host);
#   * mlx-lm (PyPI): its own greedy generate loop on the same MLX checkpoint (MLX's CPU backend);
#   * exactness: harness's logits (each kernel kind) along mlx-lm's greedy continuation pick
#     the same tokens.
# Every engine runs once per round, ROUNDS rounds (default 3) in turn; the table gives each figure's
# median and each ratio as the median of the rounds' ratios, with their range.
# Writes OUT/table.md (and the raw outputs beside it).
# Usage: bash scripts/cpu_peers.sh [OUT]   (WORK=… keeps downloads/builds/checkpoints between runs;
#        LLAMA_CPP=<built llama.cpp tree> skips the fetch and build)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-results/cpu_peers}; WORK=${WORK:-/tmp/cpu_peers_work}
N=$(nproc); THREADS=${THREADS:-"1 $N"}; [ "$N" = 1 ] && THREADS=1
mkdir -p "$OUT" "$WORK"
CFG=experiments/configs/glm4-moe-cpu-bench.json
cargo build --release -q
H=target/release/harness
PROMPT=$(python3 -c "print(','.join(str(7 + 13 * i) for i in range(16)))")
python3 -c "import torch, gguf, mlx_lm, mlx.core" 2>/dev/null || python3 -m pip install -q torch gguf "mlx[cpu]" mlx-lm cmake

LL=${LLAMA_CPP:-$WORK/llama.cpp}
if [ ! -x "$LL/build/bin/llama-bench" ]; then
  [ -d "$LL" ] || python3 scripts/peers/fetch_llama_cpp.py "$WORK"
  command -v cmake >/dev/null || python3 -m pip install -q cmake
  # Every AVX-512 extension the CPU has (harness's int8 kernels use AVX512-VNNI where present).
  has() { grep -qw "$1" /proc/cpuinfo && echo ON || echo OFF; }
  cmake -S "$LL" -B "$LL/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=$(has avx512f) \
    -DGGML_AVX512_VNNI=$(has avx512_vnni) -DGGML_AVX512_BF16=$(has avx512_bf16) \
    -DGGML_AVX512_VBMI=$(has avx512vbmi) -DGGML_AMX_TILE=OFF \
    -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > "$WORK/cmake.log"
  cmake --build "$LL/build" -j"$N" --target llama-bench llama-quantize > "$WORK/build.log"
fi

for L in bf16 mlx4; do
  [ -d "$WORK/$L" ] || $H synth --config "$CFG" --layout "$L" --out "$WORK/$L"
done
[ -f "$WORK/bf16.gguf" ] || python3 scripts/peers/gguf_convert.py "$LL" "$WORK/bf16" "$WORK/bf16.gguf" > "$WORK/convert.log" 2>&1
for q in Q4_0 Q4_1; do
  [ -f "$WORK/$q.gguf" ] || "$LL/build/bin/llama-quantize" "$WORK/bf16.gguf" "$WORK/$q.gguf" "$q" > "$WORK/quantize_$q.log" 2>&1
done

{ grep -m1 "model name" /proc/cpuinfo; echo "cores: $N"; grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E "^(avx2|avx512f|avx512_vnni|amx_int8)$" | tr '\n' ' '; echo;
  git describe --always --dirty --abbrev=12; git -C "$LL" log -1 --format=%h 2>/dev/null || echo "llama.cpp 0c1e570 (llama-cpp-python 0.3.36)"; date -u; } > "$OUT/machine.txt"
# Rounds, each running every engine once in turn (llama-bench with one repetition), so that each
# round's ratios compare runs minutes apart at most: this machine's speed drifts by ±20 % between
# minutes, which a block of llama.cpp runs then a block of harness runs would put in the ratios.
ROUNDS=${ROUNDS:-3}
# harness's kernel kinds: exact (f32 activations, the default), int8x2 (two int8 parts, inside the
# 2e-3 tolerance) and int8 (one part: llama.cpp's arithmetic, outside the tolerance; what it costs).
KINDS=${KINDS:-"exact int8x2 int8"}
for r in $(seq "$ROUNDS"); do
  for q in Q4_0 Q4_1; do
    "$LL/build/bin/llama-bench" -m "$WORK/$q.gguf" -t "${THREADS// /,}" -p 16 -n 64 -r 1 -o json \
      > "$OUT/llama_${q}_r$r.json" 2> "$OUT/llama_${q}_r$r.log"
  done
  # Q4_0 without llama.cpp's repacking (its CPU backend otherwise copies Q4_0 weights at load into
  # blocks of 8 rows interleaved, read by 8-row kernels): what the layout alone is worth to it.
  "$LL/build/bin/llama-bench" -m "$WORK/Q4_0.gguf" -t "${THREADS// /,}" -p 16 -n 64 -r 1 --repack 0 -o json \
    > "$OUT/llama_Q4_0-norepack_r$r.json" 2> "$OUT/llama_Q4_0-norepack_r$r.log"
  for t in $THREADS; do
    for k in $KINDS; do
      $H bench --model "$WORK/mlx4" --policy lru --capacity 64 --prompts 3 --prompt-len 16 --tokens 64 \
        --threads "$t" --kernels "$k" --json "$OUT/harness_t${t}_${k}_r$r.json" > "$OUT/harness_t${t}_${k}_r$r.txt" 2>&1
    done
  done
done
python3 scripts/peers/mlx_decode.py "$WORK/mlx4" "$PROMPT" 64 3 > "$OUT/mlx_lm.json"
python3 - "$OUT" "$WORK" "$PROMPT" "$KINDS" <<'PY'
import json, subprocess, sys
import numpy as np
out, work, prompt = sys.argv[1], sys.argv[2], [int(t) for t in sys.argv[3].split(",")]
gen = json.load(open(f"{out}/mlx_lm.json"))["tokens"]
seq = prompt + gen[:-1]
same = {}
for k in sys.argv[4].split():
    subprocess.run(["target/release/harness", "logits", "--model", f"{work}/mlx4", "--tokens", ",".join(map(str, seq)),
                    "--kernels", k, "--out", f"{out}/harness_logits_{k}.npy"], check=True, capture_output=True)
    picked = np.load(f"{out}/harness_logits_{k}.npy")[len(prompt) - 1:].argmax(-1).tolist()
    same[k] = {"equal": sum(a == b for a, b in zip(picked, gen)), "of": len(gen)}
json.dump(same, open(f"{out}/exactness.json", "w"))
PY
python3 scripts/peers/table.py "$OUT" > "$OUT/table.md"
cat "$OUT/table.md"
