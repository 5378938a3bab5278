#!/usr/bin/env python3
"""The side-by-side table of scripts/cpu_peers.sh from the raw outputs in OUT (markdown on stdout)."""
import glob
import json
import re
import sys

out = sys.argv[1]
llama = {}  # (quant, threads) -> (prefill, decode, decode stddev)
for q in ("Q4_0", "Q4_1"):
    for r in json.load(open(f"{out}/llama_{q}.json")):
        key = (q, r["n_threads"])
        pp, tg = llama.get(key, (None, None, None))[:2]
        if r["n_prompt"] > 0 and r["n_gen"] == 0:
            pp = r["avg_ts"]
        elif r["n_gen"] > 0 and r["n_prompt"] == 0:
            tg, sd = r["avg_ts"], r["stddev_ts"]
            llama[key] = (pp, tg, sd)
            continue
        llama[key] = (pp, tg, llama.get(key, (None, None, None))[2])
rows = []
for (q, t), (pp, tg, sd) in sorted(llama.items(), key=lambda kv: (kv[0][1], kv[0][0])):
    rows.append((t, f"llama.cpp `llama-bench`", f"GGUF {q}", pp, tg, f"± {sd:.1f} (3 reps)", "—"))
exact = json.load(open(f"{out}/exactness.json"))
for path in sorted(glob.glob(f"{out}/harness_t*_*.json")):
    t, k = re.search(r"harness_t(\d+)_(\w+)\.json", path).groups()
    b = json.load(open(path))
    res = next(r for r in b["rows"] if r["cell"] == "resident")
    same = exact.get(k, exact)  # (earlier runs recorded the exact kernels only)
    note = f"{same['equal']}/{same['of']} greedy tokens = mlx-lm's"
    if k != "exact":
        note += " (int8 activations, 2 parts)" if k in exact else "; int8 activations (2 parts) not checked"
    rows.append((int(t), f"harness `{k}` ({b['kernels']})", "MLX 4-bit", res.get("prefill_tps"), res["decode_tps"],
                 "3 prompts", note))
mlx = json.load(open(f"{out}/mlx_lm.json"))
rows.append((None, f"mlx-lm {mlx['mlx']} ({mlx['device']})", "MLX 4-bit", mlx["prefill_tps"], mlx["decode_tps"],
             "median of 3", "reference for the greedy tokens"))
print(open(f"{out}/machine.txt").read().strip().replace("\n", " · "))
print()
print("| threads | engine | weights | prefill tok/s (16) | decode tok/s (64) | spread | prefill ÷ llama.cpp Q4_0 | decode ÷ llama.cpp Q4_0 | exactness |")
print("|---|---|---|---|---|---|---|---|---|")
for t, eng, w, pp, tg, spread, note in sorted(rows, key=lambda r: (r[0] or 0, r[1])):
    base_pp, base_tg = llama.get(("Q4_0", t), (None, None, None))[:2] if t else (None, None)
    ratio = lambda v, b: f"{v / b:.2f}×" if b and v else "—"
    f = lambda v: f"{v:.1f}" if v else "—"
    print(f"| {t or 'mlx default'} | {eng} | {w} | {f(pp)} | {f(tg)} | {spread} | {ratio(pp, base_pp)} | {ratio(tg, base_tg)} | {note} |")
print()
print("harness's prefill and decode are `harness bench`'s all-resident row (every expert loaded before the measured "
      "prompts, 16-token prompts as llama-bench's pp16). llama.cpp's weights are its Q4_0/Q4_1 (block 32, f16 "
      "scale) of the bf16 synth checkpoint, harness's and mlx-lm's the MLX affine 4-bit (group 64, bf16 scale and bias) "
      "synth checkpoint: same shape, not the same values.")
