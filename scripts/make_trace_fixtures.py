"""Generate tests/fixtures/traces/: small routing traces in the formats `harness trace import`
reads, each written the way its engine writes it (from the published definitions), plus
expected.json: for every file, the harness trace rows the import must produce.

Model geometry: tests/fixtures/models/deepseek_v3-f32 (3 decoder layers, layer 0 dense, MoE
layers 1 and 2, 8 routed experts, top-2).

Formats (see src/trace/import/mod.rs for the conventions the expected rows follow):
- vLLM v0.21 (`vllm/outputs.py`, OpenAI server protocol): completion responses with
  `prompt_routed_experts` [prompt_len, num_moe_layers, top_k] and `choices[i].routed_experts`
  [gen_len, num_moe_layers, top_k] as nested lists; prefix-cached prompt tokens hold zeros.
- vLLM v0.22+ (`numpy2base64`): `choices[i].routed_experts` = base64 of `np.save` bytes, uint8,
  [prompt + output - 1, num_hidden_layers, top_k]; dense layers left zero; `usage.prompt_tokens`.
- vLLM arrays saved by a user: `np.savez(f, prompt_routed_experts=…, routed_experts=…)`.
- SGLang `ExpertDistributionRecorder` per_token dump (`python/sglang/srt/eplb/expert_distribution.py`):
  torch.save({records, last_physical_to_logical_map}); record keys forward_pass_id, rank,
  gatherer_key, input_ids, positions, extend_seq_lens, forward_mode (1 EXTEND, 2 DECODE),
  topk_ids_of_layer int32 [num_layers, num_tokens, 8] (-1 padded), misc_objects,
  global_physical_count; ids are physical.
- Megatron-Core `RouterTracer` (`megatron/core/transformer/moe/router_trace.py`):
  router_trace_rank0.jsonl, one JSON record per (micro-batch, router).
- llama.cpp `moe-trace` (PR ggml-org/llama.cpp#28544): `layer,expert` CSV rows, per
  llama_decode call layer by layer, each layer's top-k ids token by token.
- MoE-Infinity expert activation matrices: np.save of float [sequences, layers, experts] counts.

Usage: python3 scripts/make_trace_fixtures.py   (needs numpy and torch)
"""
import base64
import io
import json
import os

import numpy as np
import torch

OUT = os.path.join("tests", "fixtures", "traces")
E, K, MOE = 8, 2, [1, 2]
rng = np.random.default_rng(2026)


def route(n_tokens):
    """[n_tokens, len(MOE), K] distinct expert ids per (token, MoE layer)."""
    return np.stack(
        [np.stack([rng.choice(E, K, replace=False) for _ in MOE]) for _ in range(n_tokens)]
    )


def rows_prefill(r, prompt, pos0=0, skip=()):
    """Prefill rows, layer-major (a prefill pass runs every token through a layer at once)."""
    out = []
    for li, layer in enumerate(MOE):
        for t in range(r.shape[0]):
            if t in skip:
                continue
            out.append([prompt, 0, pos0 + t, "prefill", layer, [int(x) for x in r[t, li]]])
    return out


def rows_decode(r, prompt, pos0, step0=0):
    out = []
    for t in range(r.shape[0]):
        for li, layer in enumerate(MOE):
            out.append([prompt, step0 + t + 1, pos0 + t, "decode", layer, [int(x) for x in r[t, li]]])
    return out


expected = {}
os.makedirs(OUT, exist_ok=True)

# vLLM v0.21: two responses in a JSON list; request 1's first prompt token was a prefix-cache hit.
pa, ga = route(4), route(3)
pb, gb = route(3), route(2)
pb[0] = 0
resp = [
    {"id": "cmpl-a", "object": "text_completion", "model": "m", "prompt_routed_experts": pa.tolist(),
     "choices": [{"index": 0, "text": "x", "finish_reason": "length", "routed_experts": ga.tolist()}],
     "usage": {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}},
    {"id": "cmpl-b", "object": "text_completion", "model": "m", "prompt_routed_experts": pb.tolist(),
     "choices": [{"index": 0, "text": "y", "finish_reason": "length", "routed_experts": gb.tolist()}],
     "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}},
]
with open(os.path.join(OUT, "vllm_v021.json"), "w") as f:
    json.dump(resp, f)
expected["vllm_v021.json"] = (
    rows_prefill(pa, 0) + rows_decode(ga, 0, 4) + rows_prefill(pb, 1, skip={0}) + rows_decode(gb, 1, 3)
)

# vLLM v0.22+: one array over prompt + output - 1, decoder-layer axis, uint8, base64 .npy.
p, g = route(3), route(2)
full = np.zeros((5, 3, K), dtype=np.uint8)
full[:, 1:, :] = np.concatenate([p, g])
buf = io.BytesIO()
np.save(buf, full, allow_pickle=False)
resp = {"id": "cmpl-c", "object": "text_completion", "model": "m",
        "choices": [{"index": 0, "text": "z", "finish_reason": "length",
                     "routed_experts": base64.b64encode(buf.getvalue()).decode()}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}}
with open(os.path.join(OUT, "vllm_v022.json"), "w") as f:
    json.dump(resp, f)
expected["vllm_v022.json"] = rows_prefill(p, 0) + rows_decode(g, 0, 3)

# vLLM arrays saved with np.savez (int16, MoE-layer axis).
p, g = route(2), route(3)
np.savez(os.path.join(OUT, "vllm.npz"), prompt_routed_experts=p.astype(np.int16), routed_experts=g.astype(np.int16))
expected["vllm.npz"] = rows_prefill(p, 0) + rows_decode(g, 0, 2)

# SGLang per_token: an EXTEND pass of two requests (3 + 2 tokens), then a DECODE pass (one token
# each). 10 physical experts: physical 8 and 9 are redundant copies of logical 2 and 5.
P = 10
p2l = torch.tensor([list(range(8)) + [2, 5]] * 3, dtype=torch.int64)
l2p = {2: [2, 8], 5: [5, 9]}


def physical(ids, t):
    return [l2p[x][t % 2] if x in l2p else x for x in ids]


records, exp = [], []
for pass_i, (mode, lens, positions) in enumerate([(1, [3, 2], [0, 1, 2, 0, 1]), (2, None, [3, 2])]):
    n = len(positions)
    r = route(n)
    tk = torch.full((3, n, 8), -1, dtype=torch.int32)
    for t in range(n):
        for li, layer in enumerate(MOE):
            tk[layer, t, :K] = torch.tensor(physical([int(x) for x in r[t, li]], t), dtype=torch.int32)
    count = torch.zeros((3, P), dtype=torch.int32)
    for layer in MOE:
        for x in tk[layer].flatten().tolist():
            if x >= 0:
                count[layer, x] += 1
    records.append(dict(forward_pass_id=17 + pass_i, rank=0, gatherer_key="primary",
                        input_ids=[100 + t for t in range(n)], positions=positions, extend_seq_lens=lens,
                        forward_mode=mode, topk_ids_of_layer=tk, misc_objects=[], global_physical_count=count))
    phase = "prefill" if mode == 1 else "decode"
    for li, layer in enumerate(MOE):
        for t in range(n):
            exp.append([pass_i, 0 if mode == 1 else 1, positions[t], phase, layer, [int(x) for x in r[t, li]]])
torch.save(dict(records=records, last_physical_to_logical_map=p2l),
           os.path.join(OUT, "expert_distribution_recorder_1780000000.0_0.pt"))
expected["expert_distribution_recorder_1780000000.0_0.pt"] = exp

# Megatron-Core router trace: two micro-batches of 4 tokens at routers 1 and 2 (+ an MTP head).
lines, exp = [], []
for mb in range(2):
    r = route(4)
    for li, layer in enumerate(MOE):
        lines.append({"step": 0, "stage": "pre_dispatch", "block": "decoder", "layer": layer, "rank": 0,
                      "num_tokens": 4, "topk": K, "top_indices": [sorted(int(x) for x in r[t, li]) for t in range(4)]})
        for t in range(4):
            exp.append([mb, 0, t, "prefill", layer, sorted(int(x) for x in r[t, li])])
    if mb == 0:
        lines.append({"step": 0, "stage": "pre_dispatch", "block": "mtp", "layer": 0, "rank": 0,
                      "num_tokens": 4, "topk": K, "mtp_idx": 0, "top_indices": [[0, 1]] * 4})
with open(os.path.join(OUT, "router_trace_rank0.jsonl"), "w") as f:
    for rec in lines:
        f.write(json.dumps(rec) + "\n")
expected["router_trace_rank0.jsonl"] = exp

# llama.cpp moe-trace: a 3-token prompt in one call, then two decoded tokens.
csv, exp = [], []
p = route(3)
for li, layer in enumerate(MOE):
    for t in range(3):
        csv += [f"{layer},{int(x)}" for x in p[t, li]]
exp += rows_prefill(p, 0)
for step in range(2):
    g = route(1)
    for li, layer in enumerate(MOE):
        csv += [f"{layer},{int(x)}" for x in g[0, li]]
    exp += rows_decode(g, 0, 3 + step, step)
with open(os.path.join(OUT, "moe_trace.csv"), "w") as f:
    f.write("\n".join(csv) + "\n")
expected["moe_trace.csv"] = exp

# MoE-Infinity: activation counts of 2 sequences over 3 layers (layer 0 dense, all zero).
eam = np.zeros((2, 3, E))
eam[0, 1, [0, 3, 5]] = [3, 1, 2]
eam[0, 2, [1, 2]] = [2, 4]
eam[1, 1, [6]] = [1]
eam[1, 2, [4, 7]] = [1, 1]
np.save(os.path.join(OUT, "eam.npy"), eam)
exp = []
for s in range(2):
    for layer in MOE:
        c = sorted(((int(v), e) for e, v in enumerate(eam[s, layer]) if v > 0), key=lambda x: (-x[0], x[1]))
        for r in range(c[0][0] if c else 0):
            exp.append([s, 0, r, "prefill", layer, [e for v, e in c if v > r]])
expected["eam.npy"] = exp

with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump({"model": "tests/fixtures/models/deepseek_v3-f32", "torch": torch.__version__,
               "numpy": np.__version__, "rows": expected}, f, indent=1)
print("wrote", OUT, sorted(os.listdir(OUT)))
