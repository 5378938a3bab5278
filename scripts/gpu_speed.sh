#!/usr/bin/env bash
# Speed run on the GPU machine (see docs/performance.md), with the CUDA binary at ./harness.gz or
# ./harness (built here with `source ../shared/tools/cuda-env.sh && cargo build --release
# --features cuda`). Steps, each under a timeout so one failure does not lose the rest:
#   1. the CUDA numerics check of every test fixture against HF transformers (scripts/gpu_check.py);
#   2. a GLM-4.7-Flash-shaped MLX 4-bit checkpoint with random weights (`harness synth`, first
#      LAYERS decoder layers) and `harness bench` over a budget sweep, with loader threads
#      (default) and inline (`--load-threads 0`);
#   3. torch's pinned/pageable host→GPU copy of one expert's size and the HF transformers eager
#      decode baseline (all experts resident, bf16, same config and layer count).
# Usage: bash scripts/gpu_speed.sh OUTDIR [LAYERS] [CAPACITIES]
# Environment: IOS="cold page-cache" runs the sweep once per I/O mode (default page-cache), CACHEABLE=1 adds an LRU sweep with cacheable staging buffers, SKIP_CHECK=1 skips step 1, SKIP_HF=1 the HF baseline, SKIP_INLINE=1 the inline
# sweep; RESIDENT=0 drops the all-resident cell (needed where every expert as f32 can't fit); PROFILE=1 adds
# `--profile` to the page-cache sweep (decode milliseconds per token by part of the decoder, in a second pass);
# VARIANTS="default:;before:--gpu-experts packed --gpu-attention ops --gpu-dense f32" runs the sweep once per
# `name:extra bench arguments` (output bench_NAME.*; default: one run with the defaults),
# POLICIES=lru picks the sweep's policies (default lru,lookahead), TOKENS=64 the decode tokens a prompt (default 16). A variant whose name starts with
# `prev` runs the binary packed at .gpu/harness-prev.xz (an earlier build, for before/after in one call).
set -u
out=${1:-/tmp/gpu_out}; layers=${2:-8}; caps=${3:-8,16,32,48}
mkdir -p "$out"
source scripts/gpu_binary.sh
H=$PWD/harness
if [ -f .gpu/harness-prev.xz ] && [ ! -f harness-prev ]; then
  python3 -c "import lzma, shutil; shutil.copyfileobj(lzma.open('.gpu/harness-prev.xz'), open('harness-prev', 'wb'))"
  chmod +x harness-prev
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; free -g | head -2; } > "$out/gpu.txt" 2>&1
if [ -z "${SKIP_CHECK:-}" ]; then
  timeout 300 python3 scripts/gpu_check.py "$H" > "$out/check.txt" 2>&1; echo "check exit $?" >> "$out/check.txt"
fi
res=""; [ "${RESIDENT:-1}" = 0 ] && res=--no-resident
[ -n "${PROFILE:-}" ] && res="$res --profile"
m=/tmp/flash$layers
[ -d "$m" ] || timeout 300 $H synth --config experiments/configs/glm47-flash.json --layout mlx4 --out "$m" --layers "$layers" >> "$out/gpu.txt" 2>&1
IFS=';' read -ra variants <<< "${VARIANTS:-default:}"
for io in ${IOS:-page-cache}; do
  for v in "${variants[@]}"; do
    name=${v%%:*}; args=${v#*:}; bin=$H
    case $name in prev*) bin=$PWD/harness-prev ;; esac
    sfx=""; [ "$io" = page-cache ] || sfx="_$io"; [ "$name" = default ] || sfx="${sfx}_$name"
    timeout 240 $bin bench --model "$m" --device cuda --policy ${POLICIES:-lru,lookahead} --capacity "$caps" $res --io "$io" \
      $args --prompts 3 --tokens ${TOKENS:-16} --json "$out/bench$sfx.json" > "$out/bench$sfx.txt" 2>&1; echo "bench exit $?" >> "$out/bench$sfx.txt"
  done
done
if [ -n "${CACHEABLE:-}" ]; then
  timeout 120 $H bench --model "$m" --device cuda --policy lru --capacity "$caps" --staging cacheable \
    --no-resident --prompts 3 --tokens 16 --json "$out/bench_cacheable.json" > "$out/bench_cacheable.txt" 2>&1; echo "exit $?" >> "$out/bench_cacheable.txt"
fi
if [ -z "${SKIP_INLINE:-}" ]; then
  timeout 120 $H bench --model "$m" --device cuda --policy lru --capacity "$caps" --load-threads 0 \
    --no-resident --prompts 3 --tokens 16 --json "$out/bench_inline.json" > "$out/bench_inline.txt" 2>&1; echo "exit $?" >> "$out/bench_inline.txt"
fi
python3 scripts/h2d_bandwidth.py 5310000 >> "$out/gpu.txt" 2>&1
if [ -z "${SKIP_HF:-}" ]; then
  timeout 90 python3 scripts/hf_decode_baseline.py experiments/configs/glm47-flash.json --layers "$layers" --tokens 16 > "$out/hf.json" 2> "$out/hf.err"
fi
exit 0
