#!/usr/bin/env python3
"""The side-by-side table of scripts/cpu_peers.sh from the raw outputs in OUT (markdown on stdout).

Runs come in rounds (`*_r<N>.json`: every engine once per round, in turn); a figure is the median
over rounds, and a ratio to llama.cpp Q4_0 the median of the per-round ratios (runs of one round are
minutes apart at most), with their range. Outputs of one round without the suffix (earlier runs of
the script: llama-bench's own 3 repetitions) read as a single round."""
import glob
import os
import json
import re
import statistics
import sys

out = sys.argv[1]


def rounds(pattern):
    """{round: path} for `pattern` with `_r<N>` before `.json`, or {1: path} without."""
    found = {int(re.search(r"_r(\d+)\.json$", p).group(1)): p for p in glob.glob(pattern.replace(".json", "_r*.json"))}
    if not found and glob.glob(pattern):
        found = {1: pattern}
    return found


llama = {}  # (quant, threads) -> {round: (prefill, decode)}
for q in ("Q4_0", "Q4_0-norepack", "Q4_1"):
    for r, path in rounds(f"{out}/llama_{q}.json").items():
        for row in json.load(open(path)):
            key = (q, row["n_threads"])
            pp, tg = llama.setdefault(key, {}).get(r, (None, None))
            if row["n_prompt"] > 0 and row["n_gen"] == 0:
                pp = row["avg_ts"]
            elif row["n_gen"] > 0 and row["n_prompt"] == 0:
                tg = row["avg_ts"]
            llama[key][r] = (pp, tg)

exact_path = f"{out}/exactness.json"
exact = json.load(open(exact_path)) if os.path.exists(exact_path) else None
rows = []  # (threads, engine, weights, {round: (prefill, decode)}, note)
for (q, t), by_round in llama.items():
    eng = "llama.cpp `llama-bench`" + (" `--repack 0`" if q.endswith("-norepack") else "")
    rows.append((t, eng, f"GGUF {q.removesuffix('-norepack')}", by_round, "—"))
harness = {}
for path in glob.glob(f"{out}/harness_t*_*.json"):
    m = re.search(r"harness_t(\d+)_([a-z0-9]+?)(?:_r(\d+))?\.json$", path)
    t, k, r = int(m.group(1)), m.group(2), int(m.group(3) or 1)
    b = json.load(open(path))
    res = next(x for x in b["rows"] if x["cell"] == "resident")
    harness.setdefault((t, k, b["kernels"]), {})[r] = (res.get("prefill_tps"), res["decode_tps"])
for (t, k, label), by_round in harness.items():
    if exact is None:
        note = "not checked in this run"
    else:
        same = exact.get(k, exact)  # (earlier runs recorded the exact kernels only)
        note = f"{same['equal']}/{same['of']} of mlx-lm's greedy tokens are harness's argmax (teacher-forced)"
        parts = {"int8x2": "2 parts", "int8": "1 part, outside the 2e-3 tolerance"}.get(k)
        if parts:
            note += f" (int8 activations, {parts})" if k in exact else f"; int8 activations ({parts}) not checked"
    rows.append((t, f"harness `{k}` ({label})", "MLX 4-bit", by_round, note))
mlx_path = f"{out}/mlx_lm.json"
mlx = json.load(open(mlx_path)) if os.path.exists(mlx_path) else None


def med(vals):
    vals = [v for v in vals if v]
    return statistics.median(vals) if vals else None


def fmt(v):
    return f"{v:.1f}" if v else "—"


def ratio(by_round, base, i):
    """Median and range of the per-round ratios of field i against `base` (same rounds)."""
    rs = [by_round[r][i] / base[r][i] for r in by_round if r in base and by_round[r][i] and base[r][i]]
    if not rs:
        return "—"
    if len(rs) == 1:
        return f"{rs[0]:.2f}×"
    return f"{statistics.median(rs):.2f}× ({min(rs):.2f}–{max(rs):.2f})"


n_rounds = max((len(v) for _, _, _, v, _ in rows), default=1)
print(open(f"{out}/machine.txt").read().strip().replace("\n", " · "))
print()
print(f"| threads | engine | weights | prefill tok/s (16) | decode tok/s (64) | decode range | prefill ÷ llama.cpp Q4_0 "
      f"| decode ÷ llama.cpp Q4_0 | exactness |")
print("|---|---|---|---|---|---|---|---|---|")
if mlx:
    print(f"| mlx default | mlx-lm {mlx['mlx']} ({mlx['device']}) | MLX 4-bit | {fmt(mlx['prefill_tps'])} | "
          f"{fmt(mlx['decode_tps'])} | median of 3 | — | — | reference for the greedy tokens |")
for t, eng, w, by_round, note in sorted(rows, key=lambda r: (r[0], r[1])):
    base = llama.get(("Q4_0", t), {})
    tgs = [v[1] for v in by_round.values() if v[1]]
    spread = f"{min(tgs):.1f}–{max(tgs):.1f}" if len(tgs) > 1 else "one run"
    print(f"| {t} | {eng} | {w} | {fmt(med(v[0] for v in by_round.values()))} | "
          f"{fmt(med(v[1] for v in by_round.values()))} | {spread} | {ratio(by_round, base, 0)} | "
          f"{ratio(by_round, base, 1)} | {note} |")
print()
print(f"{n_rounds} round(s), every engine once per round in turn; figures are medians over rounds, ratios the median "
      "(and range) of the rounds' ratios. harness's prefill and decode are `harness bench`'s all-resident row (every "
      "expert loaded before the measured prompts, 3 prompts of 16 tokens as llama-bench's pp16, 64 new tokens). "
      "llama.cpp's weights are its Q4_0/Q4_1 (block 32, f16 scale) of the bf16 synth checkpoint, harness's and "
      "mlx-lm's the MLX affine 4-bit (group 64, bf16 scale and bias) synth checkpoint: same shape, not the same values. "
      "llama.cpp repacks Q4_0 at load into tiles of 8 interleaved rows for its 8-row kernels (its default); "
      "`--repack 0` reads the file's layout.")
