#!/usr/bin/env python3
"""Generate tests/fixtures/policies/libcachesim_goldens.json: hit counts of libCacheSim's LRU,
LFU and Belady on small seeded expert-access traces, the independent oracle that
tests/integration/policies_oracle.rs holds our policies (classic, unpinned mode) to.

Reference: libCacheSim's Python binding, PyPI package `libcachesim` 0.3.5
(`pip install libcachesim==0.3.5`); the version actually used is written into the JSON.

Each trace has 3 MoE layers; each layer is an independent stream of 2000 expert ids drawn from
a Zipf distribution over a seeded permutation of its experts, with temporal locality (with
probability `reuse` the id is one of the last 8 of that layer). Every layer is simulated as its own
libCacheSim cache of unit-size objects (obj_size 1, cache_size C holds C experts) for
C in 2, 4, 8, 16, requests fed one by one with `cache.get(req)`. Belady gets each request's
`next_access_vtime`: the index of the next request for the same object in that layer's stream
(2**63 - 1 for never), as libCacheSim's own readers compute it.

Run from the repository root:  python3 scripts/make_policy_goldens.py
"""

import bisect
import itertools
import json
import os
import random

import libcachesim as lcs

CACHE_SIZES = [2, 4, 8, 16]
ACCESSES = 2000
LAYERS = [3, 4, 7]  # decoder-layer numbers of the 3 MoE layers (non-contiguous on purpose)
NEVER = 2**63 - 1
# (seed, experts per layer, zipf exponent, reuse probability)
TRACES = [
    (1, 16, 0.8, 0.2),
    (2, 32, 1.0, 0.3),
    (3, 64, 1.2, 0.1),
    (4, 64, 0.6, 0.5),
]
POLICIES = {"lru": lcs.LRU, "lfu": lcs.LFU, "belady": lcs.Belady}
OUT = os.path.join("tests", "fixtures", "policies", "libcachesim_goldens.json")


def layer_stream(rng, n_experts, zipf_s, reuse):
    perm = list(range(n_experts))
    rng.shuffle(perm)
    cdf = list(itertools.accumulate(1.0 / (r + 1) ** zipf_s for r in range(n_experts)))
    seq = []
    for _ in range(ACCESSES):
        if seq and rng.random() < reuse:
            e = seq[-1 - rng.randrange(min(8, len(seq)))]
        else:
            e = perm[min(bisect.bisect_right(cdf, rng.random() * cdf[-1]), n_experts - 1)]
        seq.append(e)
    return seq


def next_uses(seq):
    nxt, last = [NEVER] * len(seq), {}
    for i in range(len(seq) - 1, -1, -1):
        nxt[i] = last.get(seq[i], NEVER)
        last[seq[i]] = i
    return nxt


def hits(policy, size, seq):
    cache = POLICIES[policy](size)
    nxt = next_uses(seq)
    n = 0
    for i, e in enumerate(seq):
        req = lcs.Request()
        req.obj_id = e + 1  # keep 0 free; ids only need to be distinct
        req.obj_size = 1
        req.clock_time = i
        req.next_access_vtime = nxt[i]
        n += bool(cache.get(req))
    assert cache.get_n_obj() <= size
    return n


def main():
    traces = []
    for seed, n_experts, zipf_s, reuse in TRACES:
        rng = random.Random(seed)
        layers = [layer_stream(rng, n_experts, zipf_s, reuse) for _ in LAYERS]
        result = {
            p: {str(c): [hits(p, c, s) for s in layers] for c in CACHE_SIZES} for p in POLICIES
        }
        traces.append(
            {
                "seed": seed,
                "num_experts": n_experts,
                "zipf_s": zipf_s,
                "reuse": reuse,
                "layers": [{"layer": l, "experts": s} for l, s in zip(LAYERS, layers)],
                "hits": result,
            }
        )
    doc = {
        "generator": "scripts/make_policy_goldens.py",
        "reference": "libCacheSim Python binding (PyPI libcachesim)",
        "libcachesim_version": lcs.__version__,
        "object_size": 1,
        "cache_sizes": CACHE_SIZES,
        "note": "one libCacheSim cache per layer; hits[policy][cache_size][i] is layer i's hit count",
        "traces": traces,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "w") as f:
        json.dump(doc, f, separators=(",", ":"))
        f.write("\n")
    print(f"wrote {OUT} ({os.path.getsize(OUT)} bytes), libcachesim {lcs.__version__}")
    for t in traces:
        print(t["seed"], {p: t["hits"][p]["8"] for p in POLICIES})


if __name__ == "__main__":
    main()
