#!/usr/bin/env bash
# Nsight Compute kernel durations of a few CUDA decode steps (first LAYERS layers of the
# GLM-4.7-Flash shape, `harness synth`, MLX 4-bit), summed per kernel and in launch order.
# Usage (on the GPU machine, ncu at /usr/local/cuda/bin): bash scripts/gpu_ncu.sh OUTDIR [LAYERS]
# Environment: SKIP / COUNT: launches skipped (prefill and the first steps) / profiled;
# DETAIL=1 adds, for six launches (after DSKIP) of the packed product kernels (`moe_gate_up*`, `moe_down*`,
# `packed_matvec`), Nsight's speed-of-light, occupancy and warp-stall sections ($OUT/detail.txt).
set -u
out=${1:-/tmp/gpu_ncu}; layers=${2:-4}
mkdir -p "$out"
source scripts/gpu_binary.sh
m=/tmp/flash$layers
[ -d "$m" ] || ./harness synth --config experiments/configs/glm47-flash.json --layout mlx4 --out "$m" --layers "$layers" > /dev/null
/usr/local/cuda/bin/ncu --metrics gpu__time_duration.sum --launch-skip "${SKIP:-300}" --launch-count "${COUNT:-120}" --csv \
  ./harness generate --model "$m" --tokens 1,2,3,4 --max-tokens 12 --device cuda > "$out/ncu.csv" 2> "$out/ncu.err"
if [ -n "${DETAIL:-}" ]; then
  /usr/local/cuda/bin/ncu --section SpeedOfLight --section Occupancy --section LaunchStats --section WarpStateStats \
    --kernel-name regex:"moe_gate_up|moe_down|packed_matvec" --launch-skip "${DSKIP:-60}" --launch-count 6 \
    ./harness generate --model "$m" --tokens 1,2,3,4 --max-tokens 12 --device cuda > "$out/detail.txt" 2>&1
fi
python3 - "$out/ncu.csv" <<'PY'
import collections, csv, sys
rows = list(csv.reader(open(sys.argv[1])))
hdr = next(i for i, r in enumerate(rows) if "Kernel Name" in r)
h = rows[hdr]
k, u, v, g, b = (h.index(c) for c in ("Kernel Name", "Metric Unit", "Metric Value", "Grid Size", "Block Size"))
scale = {"ns": 1e-3, "nsecond": 1e-3, "us": 1.0, "usecond": 1.0, "ms": 1e3, "msecond": 1e3}
agg, seq = collections.defaultdict(list), []
for r in rows[hdr + 1:]:
    if len(r) <= v:
        continue
    t = float(r[v].replace(",", "")) * scale.get(r[u], 1e-3)
    agg[(r[k][:60], r[g], r[b])].append(t)
    seq.append((r[k][:60], t))
for key, ts in sorted(agg.items(), key=lambda kv: -sum(kv[1])):
    print(f"{sum(ts):9.1f} us total {len(ts):4d} x {sum(ts) / len(ts):8.2f} us  {key}")
print("launch order:")
for n, t in seq[:40]:
    print(f"  {n} {t:.2f} us")
PY
