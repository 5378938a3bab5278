#!/usr/bin/env bash
# CPU decode at a long context beside llama.cpp, rounds interleaved: llama-bench tg64 at KV depth
# DEPTH (`-d`) on a Q4_0 GGUF against `harness bench` decode of 64 tokens after a DEPTH-token prompt
# (int8x2, every expert resident) on the MLX 4-bit synth checkpoint of the same config.
# Usage: bash scripts/peers/long_context.sh LLAMA_BENCH Q4_0.GGUF MLX4_DIR OUT ["1 2"] [DEPTH] [ROUNDS]
#   (scripts/cpu_peers.sh's WORK holds all three inputs; on the GPU machine set CUDA_VISIBLE_DEVICES=
#   and add -ngl 0 through LLAMA_ARGS.)
set -euo pipefail
cd "$(dirname "$0")/../.."
LB=$1; GGUF=$2; MLX=$3; O=$4; THREADS=${5:-"1 $(nproc)"}; DEPTH=${6:-512}; ROUNDS=${7:-3}
H=${HARNESS:-target/release/harness}
mkdir -p "$O"
for r in $(seq "$ROUNDS"); do
  # shellcheck disable=SC2086
  "$LB" -m "$GGUF" ${LLAMA_ARGS:-} -t "${THREADS// /,}" -p 0 -n 64 -d "$DEPTH" -r 1 -o json > "$O/llama_r$r.json" 2> "$O/llama_r$r.log"
  for t in $THREADS; do
    "$H" bench --model "$MLX" --device cpu --policy lru --capacity 64 --prompts 1 --prompt-len "$DEPTH" --tokens 64 \
      --threads "$t" --kernels int8x2 --json "$O/h_t${t}_r$r.json" > "$O/h_t${t}_r$r.txt" 2>&1
  done
done
python3 - "$O" "$ROUNDS" $THREADS <<'PY' | tee "$O/table.txt"
import json, statistics, sys
out, rounds, threads = sys.argv[1], int(sys.argv[2]), [int(t) for t in sys.argv[3:]]
for t in threads:
    ls, hs = [], []
    for r in range(1, rounds + 1):
        ls.append(next(x for x in json.load(open(f"{out}/llama_r{r}.json")) if x["n_threads"] == t)["avg_ts"])
        hs.append(next(x for x in json.load(open(f"{out}/h_t{t}_r{r}.json"))["rows"] if x["cell"] == "resident")["decode_tps"])
    rs = [h / l for h, l in zip(hs, ls)]
    print(f"threads {t}: llama.cpp Q4_0 {[round(x, 1) for x in ls]} tok/s, harness int8x2 {[round(x, 1) for x in hs]} tok/s, "
          f"ratio median {statistics.median(rs):.2f} ({min(rs):.2f}-{max(rs):.2f})")
PY
