"""Numerical check of the CUDA build on the GPU machine: for every test fixture, `harness logits`
on `--device cuda` (all experts through the GPU miss path: copies straight from the registered
shard mappings or through pinned staging, copy streams, quantized experts kept packed and run by
the fused kernels (default), by one matrix-vector kernel per projection, or decoded to f32), at
the smallest capacity with loader threads, at unlimited budget with inline loads, through
write-combined staging instead of the registered mappings (every other run must say `staging
registered`), with the per-projection kernel, with f32 resident experts and dense
weights (the default keeps MLX-quantized dense weights packed), and with
every token after the second as a decode step of its own (the decode path: on CUDA the fused MLA
attention kernels), and with every expert loaded first and every token after the first a decode
step (on CUDA, MLX-quantized fixtures route those tokens on the device, and the run must say so;
where every attention layer is MLA they run from a captured CUDA graph, and the run must say so),
against the HF transformers logits stored with the fixture; then one greedy `harness generate`
whose every device-chosen token is checked against the host's argmax of the same logits, and,
where every attention layer is MLA, an all-resident greedy generation from a CUDA graph with each
launch queued ahead of the last one's results, checked the same way and against the same
generation with graphs off.
Every run must say on stderr that it ran on the device asked for (`device: cuda:0`) with the kernel
forms asked for (`experts fused, attention fused, dense packed` by default), and no fused kernel may
have fallen back: a run that says otherwise counts as a failure, so a CPU result can never pass for
a GPU one, nor a fallback for the fused kernels.
Usage: python3 scripts/gpu_check.py ./harness [cuda|cpu] [NAME_PART]  (fixtures whose name contains
NAME_PART only; prints one line per run, exits 1 on a mismatch)."""
import json
import re
import pathlib
import subprocess
import sys
import tempfile

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file



def fused_form(d):
    """Whether the fixture's routed experts are MLX-quantized in every projection (the fused
    kernels' form; a decode token is then routed on the device when all are resident)."""
    keys = set()
    for f in d.glob("*.safetensors"):
        if f.name != "reference.safetensors":
            with safe_open(str(f), "np") as st:
                keys.update(st.keys())
    routed = [k for k in keys if "switch_mlp." in k or ".experts." in k]
    return bool(routed) and all(
        any(k.endswith(f"{p}.scales") for k in routed) for p in ("gate_proj", "up_proj", "down_proj"))


# Model types whose every attention layer is MLA (decode steps from a CUDA graph on CUDA).
MLA_ONLY = ("deepseek_v3", "kimi_k2", "glm4_moe_lite")

harness = sys.argv[1]
device = sys.argv[2] if len(sys.argv) > 2 else "cuda"
only = sys.argv[3] if len(sys.argv) > 3 else ""
tol = 1e-4
bad = 0
root = pathlib.Path("tests/fixtures/models")
for d in sorted(root.iterdir()):
    ref = d / "reference.json"
    if not ref.exists() or "dense" in d.name or only not in d.name:
        continue
    meta = json.loads(ref.read_text())
    want = load_file(str(d / "reference.safetensors"))["logits"].astype(np.float64)
    cfg_all = json.loads((d / "config.json").read_text())
    cfg = cfg_all.get("text_config", cfg_all)
    top_k = cfg.get("num_experts_per_tok") or cfg.get("moe_topk") or 2
    toks = ",".join(str(t) for t in meta["tokens"])
    # The last: every token after the first two as a decode step of its own (the decode path,
    # on CUDA its fused attention kernels), against the same full-pass reference.
    for extra in (["--capacity", str(top_k), "--load-threads", "4"], ["--load-threads", "0"],
                  ["--capacity", str(top_k), "--load-threads", "4", "--staging", "write-combined"],
                  ["--capacity", str(top_k), "--gpu-experts", "packed"],
                  ["--capacity", str(top_k), "--gpu-experts", "f32", "--gpu-dense", "f32"],
                  ["--capacity", str(top_k), "--prefill", "2"],
                  ["--all-resident", "--prefill", "1"]):
        with tempfile.TemporaryDirectory() as tmp:
            out = pathlib.Path(tmp) / "l.npy"
            r = subprocess.run([harness, "logits", "--model", str(d), "--tokens", toks,
                                "--out", str(out), "--device", device, *extra],
                               capture_output=True, text=True)
            if r.returncode != 0:
                print(f"{d.name} {' '.join(extra)}: FAILED {r.stderr.strip()[-300:]}")
                bad += 1
                continue
            ran_on = [l.split(":", 1)[1].strip() for l in r.stderr.splitlines() if l.startswith("device:")]
            if not ran_on or not ran_on[0].startswith(device):
                print(f"{d.name} {' '.join(extra)}: FAILED ran on {ran_on or 'an unnamed device'}, not {device}")
                bad += 1
                continue
            # The kernel forms asked for are the ones the run says it used, and no fused kernel
            # fell back for want of compiling ("… unavailable").
            if device == "cuda":
                arg = lambda flag, default: extra[extra.index(flag) + 1] if flag in extra else default
                # Misses copied straight from the registered shard mappings by default (staging
                # `auto` on fixtures this small), through write-combined staging when asked.
                staging = arg('--staging', 'registered').replace('auto', 'registered')
                want_forms = [f"experts {arg('--gpu-experts', 'fused')}",
                              f"attention {arg('--gpu-attention', 'fused')}",
                              f"dense {arg('--gpu-dense', 'packed')}",
                              f"staging {staging}"]
                missing = [f for f in want_forms if f not in ran_on[0]]
                fell_back = [l for l in r.stderr.splitlines() if "unavailable" in l]
                # Decode work that left a fused kernel says so in the label (models::fallback).
                if "fell back" in ran_on[0]:
                    fell_back.append(ran_on[0])
                # With every expert resident, each decode token of an MLX-quantized fixture
                # (experts in the fused form) is routed on the device, and the label counts them.
                if "--all-resident" in extra:
                    n = len(meta["tokens"]) if fused_form(d) else 0
                    if f"routing device ({n} tokens on the device)" not in ran_on[0]:
                        missing.append(f"{n} tokens routed on the device")
                    # Where every attention layer is MLA, those tokens run from a CUDA graph:
                    # the first decode step uncaptured, the second captured, the rest replayed;
                    # the graph's logits are the ones checked against HF below.
                    # Where the routers are unquantized (f32 on the GPU), every layer's router
                    # product and routes are issued as one launch; MLX-packed routers: split.
                    if n:
                        one = re.search(r"routers issued in one launch (\d+), as product \+ route (\d+)", ran_on[0])
                        fused_router = cfg.get("model_type") in ("deepseek_v3", "glm4_moe")
                        if not one or (int(one.group(1)) > 0) != fused_router or (int(one.group(2)) > 0) == fused_router:
                            missing.append("routers issued in one launch" if fused_router else "routers issued as product + route")
                    if n and cfg.get("model_type") in MLA_ONLY:
                        g = f"graph auto (1 captures, {n - 2} tokens from a graph, 0 of them queued ahead, 0 with gates, 0 of their 0 misses copied by the gates)"
                        if g not in ran_on[0]:
                            missing.append(g)
                        fell_back += [l for l in r.stderr.splitlines() if l.startswith("CUDA graph:")]
                # A lazy cell (capacity top-k, every miss loaded) decoding token by token: from
                # the first decode step on (after one uncaptured, one captured) its tokens run
                # from a graph whose MoE layers wait at gates for the host to load the misses;
                # those logits are the ones checked against HF below.
                if "--prefill" in extra and "--capacity" in extra and fused_form(d) \
                        and cfg.get("model_type") in MLA_ONLY and arg('--gpu-experts', 'fused') == 'fused':
                    n = len(meta["tokens"]) - int(arg('--prefill', '0')) - 1
                    # ... and those gates copy every miss of their steps themselves (registered
                    # staging, LRU: no prefetch in flight), at least one.
                    g = rf"graph auto \(1 captures, {n} tokens from a graph, 0 of them queued ahead, {n} with gates, ([1-9]\d*) of their (\d+) misses copied by the gates\)"
                    m = re.search(g, ran_on[0])
                    if not m or m.group(1) != m.group(2):
                        missing.append(g + " (all of the misses)")
                    fell_back += [l for l in r.stderr.splitlines() if l.startswith("CUDA graph:")]
                if missing or fell_back:
                    got = np.load(out).astype(np.float64).reshape(want.shape)
                    err = np.linalg.norm(got - want) / np.linalg.norm(want)
                    print(f"{d.name} {' '.join(extra)}: FAILED kernels {ran_on[0]} lack {missing} or fell back {fell_back} (relative L2 {err:.2e})")
                    bad += 1
                    continue
            got = np.load(out).astype(np.float64).reshape(want.shape)
            err = np.linalg.norm(got - want) / np.linalg.norm(want)
            ok = err <= tol
            bad += not ok
            print(f"{d.name} {' '.join(extra)} on {ran_on[0]}: relative L2 {err:.2e} {'ok' if ok else 'MISMATCH'}")
    # Greedy decoding picks each token where the logits are (on CUDA a device argmax, only the
    # index copied back); HARNESS_CHECK_GREEDY=1 makes every such pick also on the host and fails
    # the run on a difference.
    import os
    r = subprocess.run([harness, "generate", "--model", str(d), "--tokens", toks, "--max-tokens", "8",
                        "--device", device], capture_output=True, text=True,
                       env={**os.environ, "HARNESS_CHECK_GREEDY": "1"})
    said = [l for l in r.stderr.splitlines() if f" on {device}" in l]
    # The run must say that every token it generated was chosen on the device and checked.
    checked = [l.split() for l in r.stderr.splitlines() if l.startswith("greedy check: ")]
    all_checked = device != "cuda" or (checked and checked[0][2] == checked[0][4] and checked[0][2] != "0")
    ok = (r.returncode == 0 and said and all_checked
          and not any("unavailable" in l for l in r.stderr.splitlines()))
    bad += not ok
    print(f"{d.name} generate greedy (device pick = host pick): {'ok' if ok else 'FAILED ' + r.stderr.strip()[-300:]}")
    # All resident, where every attention layer is MLA: greedy tokens run from a CUDA graph that
    # embeds its token and picks the next on the device, each launch queued while the host still
    # reads the one before. Of 8 tokens: the prompt's, one uncaptured step, one captured (which
    # queues the next), five queued ahead; every pick checked against the host's argmax of the
    # same launch's logits, and the tokens equal to those of the run without graphs.
    if device == "cuda" and cfg.get("model_type") in MLA_ONLY and fused_form(d):
        gen = {g: subprocess.run([harness, "generate", "--model", str(d), "--tokens", toks, "--max-tokens", "8",
                                  "--device", device, "--all-resident", "--gpu-graph", g],
                                 capture_output=True, text=True, env={**os.environ, "HARNESS_CHECK_GREEDY": "1"})
               for g in ("auto", "off")}
        a, o = gen["auto"], gen["off"]
        want_g = "graph auto (1 captures, 6 tokens from a graph, 5 of them queued ahead, 0 with gates, 0 of their 0 misses copied by the gates)"
        ok = (a.returncode == 0 and o.returncode == 0 and want_g in a.stderr
              and "greedy check: 8 of 8 tokens" in a.stderr and a.stdout.strip() == o.stdout.strip()
              and not any(l.startswith("CUDA graph:") for l in a.stderr.splitlines()))
        bad += not ok
        print(f"{d.name} generate greedy all resident, graph with launches queued ahead = graph off "
              f"({a.stdout.strip()}): {'ok' if ok else 'FAILED ' + a.stderr.strip()[-400:] + ' | off: ' + o.stdout.strip()}")
    # A lazy cell (capacity top-k: misses at most steps), LRU and lookahead: greedy tokens from a
    # graph whose MoE layers wait at gates while the host reports each step to the cache, loads
    # the misses and answers with the experts' addresses (nothing queued ahead). Of 8 tokens:
    # the prompt's, one uncaptured step, then 6 from the graph, all gated; every pick checked
    # against the host's argmax of the same launch's logits, the tokens and the cache's misses
    # equal to those of the run without gates (`--gpu-graph resident`: routed on the host). The
    # gates copy the misses themselves (registered staging: the label counts them); with
    # HARNESS_STEP_COPIES=0 the host copies them through the copy engine, same tokens and misses.
    if device == "cuda" and cfg.get("model_type") in MLA_ONLY and fused_form(d):
        for policy in ("lru", "lookahead"):
            runs = {"auto": ("auto", {}), "resident": ("resident", {}),
                    "dma": ("auto", {"HARNESS_STEP_COPIES": "0"})}
            gen = {k: subprocess.run([harness, "generate", "--model", str(d), "--tokens", toks, "--max-tokens", "8",
                                      "--device", device, "--capacity", str(top_k), "--policy", policy,
                                      "--gpu-graph", g],
                                     capture_output=True, text=True,
                                     env={**os.environ, "HARNESS_CHECK_GREEDY": "1", **env})
                   for k, (g, env) in runs.items()}
            a, o, c = gen["auto"], gen["resident"], gen["dma"]
            # The cache's counts of the run (accesses, hit rate, misses): equal, and misses seen.
            misses = lambda r: (re.findall(r"cache: \d+ accesses, hit rate [\d.]+% \((\d+) misses\)", r.stderr) or ["0"])[0]
            gated = r"graph auto \(1 captures, 6 tokens from a graph, 0 of them queued ahead, 6 with gates, (\d+) of their (\d+) misses copied by the gates\)"
            counts = lambda r: [int(v) for v in (re.findall(gated, r.stderr) or [("-1", "-1")])[0]]
            copied = lambda r: counts(r)[0]
            # LRU: every miss of the gated steps copied by their gates (none may be; the
            # greedy tokens can repeat their routes); lookahead: prefetches loaded in flight
            # are not the gates' to copy, but some misses are.
            gates_ok = (counts(a)[0] == counts(a)[1] >= 0) if policy == "lru" else copied(a) > 0
            ok = (all(r.returncode == 0 for r in (a, o, c)) and gates_ok and copied(c) == 0
                  and (policy != "lru" or counts(c)[1] == counts(a)[1])
                  and all("greedy check: 8 of 8 tokens" in r.stderr for r in (a, c))
                  and a.stdout.strip() == o.stdout.strip() == c.stdout.strip()
                  and misses(a) == misses(o) == misses(c) and int(misses(a)) > 0
                  and not any(l.startswith("CUDA graph:") for r in (a, c) for l in r.stderr.splitlines()))
            bad += not ok
            print(f"{d.name} generate greedy {policy} capacity {top_k}, graph with gates (misses copied by the "
                  f"gates, by the copy engine) = no gates ({a.stdout.strip()}; {misses(a)} misses, {copied(a)} of "
                  f"the gated steps' {counts(a)[1]} copied by the gates): {'ok' if ok else 'FAILED ' + a.stderr.strip()[-500:] + ' | dma: ' + c.stderr.strip()[-300:] + ' | resident: ' + o.stdout.strip() + ' ' + o.stderr.strip()[-300:]}")
sys.exit(1 if bad else 0)
