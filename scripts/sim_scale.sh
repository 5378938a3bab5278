#!/usr/bin/env bash
# Traces at serving scale (docs/performance.md, "Simulator at serving scale"): whole-process
# replay speed of `harness simulate` against libCacheSim's own C simulator on the same accesses,
# and the peak memory of a long study. Run on an otherwise idle machine.
#
#   bash scripts/sim_scale.sh [OUT_DIR] [SMALL_ACCESSES] [LARGE_ACCESSES]
#
# 1. a seeded synthetic trace of SMALL_ACCESSES (default 20 M; Qwen3-Coder-Next's shape: 48 MoE
#    layers × 512 experts, top-10) written by `harness trace synth`, exported for libCacheSim by
#    `harness trace export --to libcachesim`; LRU and Belady over one global pool of 3072 unit
#    experts (classic mode), `harness simulate` under /usr/bin/time vs libCacheSim's
#    `process_trace` (benches/libcachesim_compare.py, PyPI libcachesim);
# 2. a trace of LARGE_ACCESSES (default 500 M) replayed under 6 policies × 4 budgets in one
#    `harness simulate`, with its wall time and peak RSS.
set -euo pipefail
OUT=${1:-/tmp/sim_scale}
SMALL=${2:-20000000}
LARGE=${3:-500000000}
H=${HARNESS:-target/release/harness}
mkdir -p "$OUT"
# Always the binary of this checkout (a no-op when it is up to date), and say which it is.
[ -n "${HARNESS:-}" ] || cargo build --release
echo "binary: $H ($(stat -c %y "$H")), checkout $(git rev-parse --short HEAD)$(git diff --quiet || echo ' + uncommitted changes')"
python3 -c "import libcachesim" 2>/dev/null || pip install -q "libcachesim==0.3.5"

timed() { # label, command...: runs it, prints wall seconds and peak RSS
  local label=$1; shift
  /usr/bin/time -f "$label: wall %e s, peak RSS %M KB" "$@"
}

if [ "$SMALL" != 0 ]; then
echo "== $SMALL accesses: harness vs libCacheSim, one global pool of 3072 unit experts"
timed synth "$H" trace synth --out "$OUT/small.parquet" --accesses "$SMALL"
timed export "$H" trace export --to libcachesim "$OUT/small.parquet" "$OUT/small.oracleGeneral"
# Three rounds, interleaved (this VM's speed drifts by tens of percent between minutes): our
# whole process (wall time from /usr/bin/time: start-up, Parquet decoding, replay) against
# libCacheSim's process_trace time (its binary trace read included, Python start-up not).
: > "$OUT/rounds.txt"
for round in 1 2 3; do
  for p in lru belady; do
    /usr/bin/time -f "%e" -o "$OUT/t_$p" "$H" simulate --trace "$OUT/small.parquet" --policy "$p" \
      --budget 3072 --expert-bytes 1 --pool global --unpinned --stats --json > "$OUT/small_$p.json"
    echo "harness $p $(cat "$OUT/t_$p") $(python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[0]['hit_rate'])" "$OUT/small_$p.json")" >> "$OUT/rounds.txt"
  done
  python3 benches/libcachesim_compare.py "$OUT/small.oracleGeneral" 3072 | python3 -c "
import json,sys
for l in sys.stdin:
    r=json.loads(l); print('libcachesim', r['policy'], r['seconds'], 1-r['miss_ratio'])" >> "$OUT/rounds.txt"
done
python3 - "$OUT/rounds.txt" "$SMALL" <<'PY'
import statistics, sys
rows = [l.split() for l in open(sys.argv[1])]
n = int(sys.argv[2])
for p in ["lru", "belady"]:
    ours = [float(r[2]) for r in rows if r[0] == "harness" and r[1] == p]
    theirs = [float(r[2]) for r in rows if r[0] == "libcachesim" and r[1] == p]
    h1 = {r[3][:8] for r in rows if r[0] == "harness" and r[1] == p}
    h2 = {r[3][:8] for r in rows if r[0] == "libcachesim" and r[1] == p}
    mo, mt = statistics.median(ours), statistics.median(theirs)
    print(f"{p}: harness {mo:.2f} s ({n/mo/1e6:.1f} M/s; rounds {ours}), libCacheSim {mt:.2f} s "
          f"({n/mt/1e6:.1f} M/s; rounds {theirs}): {mt/mo:.2f}x; hit rates {sorted(h1)} vs {sorted(h2)}")
PY

fi

[ "$LARGE" = 0 ] && exit 0
echo "== $LARGE accesses: 6 policies x 4 budgets in one pass"
timed synth "$H" trace synth --out "$OUT/large.parquet" --accesses "$LARGE"
ls -l "$OUT/large.parquet"
timed "harness 24 replays" "$H" simulate --trace "$OUT/large.parquet" \
  --policy lru,lfu,lcp,lfu-decay,lookahead,belady --capacity 16,32,64,128 --stats --json > "$OUT/large.json"
python3 -c "
import json,sys
for r in json.load(open(sys.argv[1])):
    print(f\"  {r['policy']:<14} {r['budget']:>14} hit rate {r['hit_rate']:.4f}\")" "$OUT/large.json"
