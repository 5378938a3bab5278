#!/usr/bin/env python3
"""Train `glm4-moe-tiny`, the small GLM-4.5-style MoE shipped as moe-harness's default model.

One script does the whole pipeline, deterministically from `--seed`:

1. corpus: every `*.py` file of the running interpreter's standard library (PSF licence), read in
   sorted path order; 5 % of the files (chosen by the MD5 of their relative path) are held out;
2. a byte-level BPE tokenizer (HF `tokenizers`, vocabulary 4096, one special token
   `<|endoftext|>` that separates files) trained on the training split only;
3. a `glm4_moe` model written here in plain PyTorch with exactly the semantics of
   transformers' `Glm4MoeForCausalLM` (partial RoPE, q/k/v bias, qk-norm, sigmoid `noaux_tc`
   router with groups, one shared expert, first layer dense); experts are evaluated densely and
   masked by the routing weights, which is exact (an unselected expert has weight 0) and fast for
   these tiny experts;
4. expert balancing without auxiliary loss (DeepSeek-V3 section 2.1.2): after every optimiser step,
   `e_score_correction_bias[e] += gamma * sign(mean_load - load[e])` per MoE layer; the bias is then
   shifted so its minimum is 0, which changes no routing decision (top-k and group scores are
   invariant to a common shift) but keeps `sigmoid + bias > 0`, so implementations that mask
   excluded groups with 0.0 (mlx-lm) and with -inf (transformers) pick the same experts;
5. evaluation on the held-out split, routing statistics, a check that transformers loads the
   exported checkpoint and reproduces this model's logits, and sample generations;
6. export in the hub layout (`config.json` with top-level `rope_theta`/`partial_rotary_factor`,
   per-expert keys `model.layers.{i}.mlp.experts.{e}.{gate,up,down}_proj.weight`, bf16, float32
   `e_score_correction_bias`, shards of at most `--shard-mb` MB with `model.safetensors.index.json`).

The shipped model (models/glm4-moe-tiny, 72 s on one H200):
    python3 training/pack_corpus.py /path/to/lib/python3.13 /tmp/cpython-3.13.0-lib.tar.gz
    python3 training/train_glm4_moe_tiny.py --out /tmp/stage --corpus /tmp/cpython-3.13.0-lib.tar.gz --compile
Smoke (CPU):  python3 training/train_glm4_moe_tiny.py --out /tmp/smoke --smoke --threads 1
The MLX 4-bit copy is made afterwards by `training/convert_mlx.py`.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import random
import sys
import sysconfig
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

EOT = "<|endoftext|>"

# Hub-style config (GLM-4.5 field names); vocab_size is fixed even if a tiny smoke corpus yields
# fewer merges.
CONFIG = {
    "architectures": ["Glm4MoeForCausalLM"],
    "model_type": "glm4_moe",
    "vocab_size": 4096,
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": 6,
    "first_k_dense_replace": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 32,
    "partial_rotary_factor": 0.5,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "max_position_embeddings": 2048,
    "attention_bias": True,
    "attention_dropout": 0.0,
    "use_qk_norm": True,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-5,
    "n_routed_experts": 64,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "num_nextn_predict_layers": 0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "use_cache": True,
    "torch_dtype": "bfloat16",
}


# ----------------------------------------------------------------------------------------------
# corpus and tokenizer
# ----------------------------------------------------------------------------------------------
def read_sources(root: str) -> dict[str, bytes]:
    """`*.py` files of a standard library directory, or of a .tar.gz made by pack_corpus.py."""
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from pack_corpus import SKIP_DIRS, wanted

    files = {}
    if os.path.isfile(root):
        import tarfile

        with tarfile.open(root, "r:*") as tar:
            for m in tar.getmembers():
                rel = m.name.split("/", 1)[1]
                if m.isfile() and wanted(rel):
                    files[rel] = tar.extractfile(m).read()
        return files
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        for name in filenames:
            rel = os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")
            if wanted(rel):
                with open(os.path.join(dirpath, name), "rb") as f:
                    files[rel] = f.read()
    return files


def collect_corpus(root: str, val_percent: int, max_files: int | None):
    """Return (train, val) lists of (relative path, text), in sorted path order; a file is held
    out when the MD5 of its relative path falls in the first `val_percent` of 100 buckets."""
    files = read_sources(root)
    paths = sorted(files)
    if max_files:
        paths = paths[:: max(1, len(paths) // max_files)][:max_files]
    train, val = [], []
    for rel in paths:
        try:
            text = files[rel].decode("utf-8")
        except UnicodeDecodeError:
            continue
        text = text.replace("\r\n", "\n")
        if not text.strip():
            continue
        bucket = int(hashlib.md5(rel.encode()).hexdigest()[:8], 16) % 100
        (val if bucket < val_percent else train).append((rel, text))
    return train, val


def train_tokenizer(texts, vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tok


def encode(tok, texts, eot_id: int) -> np.ndarray:
    out = []
    for enc in tok.encode_batch(texts):
        out.extend(enc.ids)
        out.append(eot_id)
    return np.asarray(out, dtype=np.uint16)


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": EOT,
    "eos_token": EOT,
    "pad_token": EOT,
    "unk_token": None,
    "add_bos_token": False,
    "add_eos_token": False,
    "add_prefix_space": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": 2048,
    "added_tokens_decoder": {
        "0": {
            "content": EOT,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
    },
}


# ----------------------------------------------------------------------------------------------
# model (same maths as transformers' Glm4MoeForCausalLM)
# ----------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.nh, self.nkv, self.hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        h, b = c["hidden_size"], c["attention_bias"]
        self.q_proj = nn.Linear(h, self.nh * self.hd, bias=b)
        self.k_proj = nn.Linear(h, self.nkv * self.hd, bias=b)
        self.v_proj = nn.Linear(h, self.nkv * self.hd, bias=b)
        self.o_proj = nn.Linear(self.nh * self.hd, h, bias=False)
        self.use_qk_norm = c["use_qk_norm"]
        if self.use_qk_norm:
            self.q_norm = RMSNorm(self.hd, c["rms_norm_eps"])
            self.k_norm = RMSNorm(self.hd, c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.nh, self.hd)
        k = self.k_proj(x).view(B, T, self.nkv, self.hd)
        v = self.v_proj(x).view(B, T, self.nkv, self.hd)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        rd = cos.shape[-1]
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = torch.cat([q[..., :rd] * cos + rotate_half(q[..., :rd]) * sin, q[..., rd:]], dim=-1)
        k = torch.cat([k[..., :rd] * cos + rotate_half(k[..., :rd]) * sin, k[..., rd:]], dim=-1)
        rep = self.nh // self.nkv
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.nh * self.hd))


class MLP(nn.Module):
    def __init__(self, h, i):
        super().__init__()
        self.gate_proj = nn.Linear(h, i, bias=False)
        self.up_proj = nn.Linear(h, i, bias=False)
        self.down_proj = nn.Linear(i, h, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Sigmoid noaux_tc router + 64 routed experts + 1 shared expert."""

    def __init__(self, c):
        super().__init__()
        self.E, self.k = c["n_routed_experts"], c["num_experts_per_tok"]
        self.G, self.kg = c["n_group"], c["topk_group"]
        self.H, self.I = c["hidden_size"], c["moe_intermediate_size"]
        self.rsf, self.norm = c["routed_scaling_factor"], c["norm_topk_prob"]
        self.gate_weight = nn.Parameter(torch.empty(self.E, self.H))
        self.register_buffer("e_score_correction_bias", torch.zeros(self.E))
        self.w_gate = nn.Parameter(torch.empty(self.E, self.I, self.H))
        self.w_up = nn.Parameter(torch.empty(self.E, self.I, self.H))
        self.w_down = nn.Parameter(torch.empty(self.E, self.H, self.I))
        self.shared_experts = MLP(self.H, self.I * c["n_shared_experts"])
        self.record = None  # a list to append top-k indices to (routing statistics)

    def route(self, x):
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.linear(x.float(), self.gate_weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        group_scores = choice.view(-1, self.G, self.E // self.G).topk(2, dim=-1)[0].sum(-1)
        group_idx = group_scores.topk(self.kg, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0)
        score_mask = group_mask.unsqueeze(-1).expand(-1, self.G, self.E // self.G).reshape(-1, self.E)
        choice = choice.masked_fill(score_mask == 0, float("-inf"))
        idx = choice.topk(self.k, dim=-1, sorted=False)[1]
        w = scores.gather(1, idx)
        if self.norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * self.rsf

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, self.H)
        N = x.shape[0]
        idx, w = self.route(x)
        if self.record is not None:
            self.record.append(idx.detach().to(torch.uint8).cpu())
        dense_w = torch.zeros(N, self.E, device=x.device, dtype=w.dtype).scatter(1, idx, w)
        w_gu = torch.cat([self.w_gate.reshape(-1, self.H), self.w_up.reshape(-1, self.H)], 0)
        g, u = F.linear(x, w_gu).chunk(2, dim=-1)
        h = F.silu(g) * u
        h = (h.view(N, self.E, self.I) * dense_w.to(h.dtype).unsqueeze(-1)).reshape(N, self.E * self.I)
        w_d = self.w_down.permute(1, 0, 2).reshape(self.H, self.E * self.I)
        y = F.linear(h, w_d) + self.shared_experts(x)
        counts = torch.zeros(self.E, device=x.device, dtype=torch.float32)
        counts.scatter_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=x.device))
        return y.view(shape), counts


class Layer(nn.Module):
    def __init__(self, c, i):
        super().__init__()
        self.self_attn = Attention(c)
        self.is_moe = i >= c["first_k_dense_replace"]
        self.mlp = MoE(c) if self.is_moe else MLP(c["hidden_size"], c["intermediate_size"])
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])

    def forward(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        if self.is_moe:
            y, counts = self.mlp(self.post_attention_layernorm(x))
            return x + y, counts
        return x + self.mlp(self.post_attention_layernorm(x)), None


class Glm4MoeTiny(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        self.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList([Layer(c, i) for i in range(c["num_hidden_layers"])])
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        rd = int(c["head_dim"] * c["partial_rotary_factor"])
        inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, rd, 2, dtype=torch.float) / rd))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.init_weights()

    def init_weights(self):
        std = self.c["initializer_range"]
        out_std = std / math.sqrt(2 * self.c["num_hidden_layers"])
        for name, p in self.named_parameters():
            if p.dim() == 1:
                if name.endswith("norm.weight"):
                    nn.init.ones_(p)
                else:
                    nn.init.zeros_(p)
            elif name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                nn.init.normal_(p, 0.0, out_std)
            else:
                nn.init.normal_(p, 0.0, std)

    def moe_layers(self):
        return [l.mlp for l in self.layers if l.is_moe]

    def forward(self, ids, targets=None):
        B, T = ids.shape
        pos = torch.arange(T, device=ids.device, dtype=torch.float)
        freqs = torch.outer(pos, self.inv_freq)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        x = self.embed_tokens(ids)
        all_counts = []
        for layer in self.layers:
            x, counts = layer(x, cos, sin)
            if counts is not None:
                all_counts.append(counts)
        logits = self.lm_head(self.norm(x))
        counts = torch.stack(all_counts)
        if targets is None:
            return logits, counts
        loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return loss, counts


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------
def hf_state_dict(model: Glm4MoeTiny):
    """Hub key layout, bf16 weights, float32 e_score_correction_bias."""
    sd = {}
    bf = lambda t: t.detach().to(torch.bfloat16).contiguous().cpu()  # noqa: E731
    sd["model.embed_tokens.weight"] = bf(model.embed_tokens.weight)
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}"
        a = layer.self_attn
        for n in ("q_proj", "k_proj", "v_proj"):
            sd[f"{p}.self_attn.{n}.weight"] = bf(getattr(a, n).weight)
            sd[f"{p}.self_attn.{n}.bias"] = bf(getattr(a, n).bias)
        sd[f"{p}.self_attn.o_proj.weight"] = bf(a.o_proj.weight)
        if a.use_qk_norm:
            sd[f"{p}.self_attn.q_norm.weight"] = bf(a.q_norm.weight)
            sd[f"{p}.self_attn.k_norm.weight"] = bf(a.k_norm.weight)
        sd[f"{p}.input_layernorm.weight"] = bf(layer.input_layernorm.weight)
        sd[f"{p}.post_attention_layernorm.weight"] = bf(layer.post_attention_layernorm.weight)
        m = layer.mlp
        if layer.is_moe:
            sd[f"{p}.mlp.gate.weight"] = bf(m.gate_weight)
            sd[f"{p}.mlp.gate.e_score_correction_bias"] = (
                m.e_score_correction_bias.detach().float().contiguous().cpu()
            )
            for e in range(m.E):
                sd[f"{p}.mlp.experts.{e}.gate_proj.weight"] = bf(m.w_gate[e])
                sd[f"{p}.mlp.experts.{e}.up_proj.weight"] = bf(m.w_up[e])
                sd[f"{p}.mlp.experts.{e}.down_proj.weight"] = bf(m.w_down[e])
            s = m.shared_experts
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{p}.mlp.shared_experts.{n}.weight"] = bf(getattr(s, n).weight)
        else:
            for n in ("gate_proj", "up_proj", "down_proj"):
                sd[f"{p}.mlp.{n}.weight"] = bf(getattr(m, n).weight)
    sd["model.norm.weight"] = bf(model.norm.weight)
    sd["lm_head.weight"] = bf(model.lm_head.weight)
    return sd


def save_sharded(sd, out_dir, max_bytes):
    from safetensors.torch import save_file

    shards, cur, cur_bytes = [], {}, 0
    for k, t in sd.items():
        nb = t.numel() * t.element_size()
        if cur and cur_bytes + nb > max_bytes:
            shards.append(cur)
            cur, cur_bytes = {}, 0
        cur[k] = t
        cur_bytes += nb
    shards.append(cur)
    n = len(shards)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file(shard, os.path.join(out_dir, name), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = name
            total += t.numel() * t.element_size()
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return n, total


# ----------------------------------------------------------------------------------------------
# evaluation helpers
# ----------------------------------------------------------------------------------------------
def windows(arr: torch.Tensor, T: int):
    """Non-overlapping (input, target) windows of length T covering arr."""
    n = (arr.numel() - 1) // T
    x = arr[: n * T].view(n, T)
    y = arr[1 : n * T + 1].view(n, T)
    return x, y


@torch.no_grad()
def evaluate(model, x, y, batch, amp):
    model.eval()
    tot, cnt = 0.0, 0
    for i in range(0, x.shape[0], batch):
        xb, yb = x[i : i + batch], y[i : i + batch]
        with torch.autocast(device_type=xb.device.type, dtype=torch.bfloat16, enabled=amp):
            loss, _ = model(xb, yb)
        tot += loss.item() * yb.numel()
        cnt += yb.numel()
    model.train()
    return tot / cnt


@torch.no_grad()
def routing_stats(model, x, batch, amp, seed):
    """Per-MoE-layer routing statistics on held-out windows vs uniform random routing."""
    moes = model.moe_layers()
    for m in moes:
        m.record = []
    model.eval()
    for i in range(0, x.shape[0], batch):
        with torch.autocast(device_type=x.device.type, dtype=torch.bfloat16, enabled=amp):
            model(x[i : i + batch])
    model.train()
    E, k = moes[0].E, moes[0].k
    n_win, T = x.shape
    rng = np.random.default_rng(seed)
    out = {"tokens": int(n_win * T), "window": T, "experts": E, "top_k": k, "layers": {}}
    out["uniform"] = {
        "freq_entropy_norm": 1.0,
        "top16_share": 16 / E,
        "max_over_mean_load": 1.0,
        "reuse_prev1": k / E,
        "reuse_any_prev4": 1 - (1 - k / E) ** 4,
    }
    layer_ids = [i for i, l in enumerate(model.layers) if l.is_moe]
    for li, m in zip(layer_ids, moes):
        idx = torch.cat(m.record).long().view(n_win, T, k)
        m.record = None
        counts = torch.bincount(idx.reshape(-1), minlength=E).double()
        p = counts / counts.sum()
        ent = float(-(p[p > 0] * p[p > 0].log()).sum() / math.log(E))
        onehot = torch.zeros(n_win, T, E, dtype=torch.bool)
        onehot.scatter_(2, idx, True)
        reuse1 = float((onehot[:, 1:] & onehot[:, :-1]).sum(-1).double().mean() / k)
        prev4 = torch.zeros(n_win, T - 4, E, dtype=torch.bool)
        for d in range(1, 5):
            prev4 |= onehot[:, 4 - d : T - d]
        reuse4 = float((onehot[:, 4:] & prev4).sum(-1).double().mean() / k)
        flat = onehot.view(-1, E)
        perm = torch.from_numpy(rng.permutation(flat.shape[0]))
        reuse_shuf = float((flat & flat[perm]).sum(-1).double().mean() / k)
        out["layers"][str(li)] = {
            "freq_entropy_norm": ent,
            "top16_share": float(p.sort(descending=True).values[:16].sum()),
            "max_over_mean_load": float(p.max() * E),
            "min_over_mean_load": float(p.min() * E),
            "unused_experts": int((counts == 0).sum()),
            "reuse_prev1": reuse1,
            "reuse_prev1_shuffled": reuse_shuf,
            "reuse_any_prev4": reuse4,
            "bias_range": float(m.e_score_correction_bias.max() - m.e_score_correction_bias.min()),
        }
    return out


def bench(args, train_t, dev, amp, compile_, batch):
    """Time training steps (forward, backward, AdamW, bias update) for one configuration."""
    torch.manual_seed(args.seed)
    model = Glm4MoeTiny(CONFIG).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=amp)
    fwd = torch.compile(model) if compile_ else model
    offs = torch.arange(args.seq + 1, device=dev)
    t0 = time.time()
    t_warm = None
    for step in range(args.bench):
        if step == 5:
            torch.cuda.synchronize() if amp else None
            t_warm = time.time()
        start = torch.randint(0, train_t.numel() - args.seq - 1, (batch,)).to(dev)
        chunk = train_t[start[:, None] + offs]
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss, counts = fwd(chunk[:, :-1], chunk[:, 1:])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for m, c in zip(model.moe_layers(), counts):
                m.e_score_correction_bias += 1e-3 * torch.sign(c.mean() - c)
    torch.cuda.synchronize() if amp else None
    dt = time.time() - t_warm
    n = args.bench - 5
    print(f"BENCH compile={compile_} batch={batch}x{args.seq}: {n*batch*args.seq/dt/1e6:.3f} M tok/s, "
          f"{dt/n*1e3:.1f} ms/step, first 5 steps {t_warm-t0:.1f}s, loss {loss.item():.3f}, "
          f"peak mem {torch.cuda.max_memory_allocated()/2**30 if amp else 0:.1f} GiB", flush=True)
    if amp:
        torch.cuda.reset_peak_memory_stats()


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------
def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="staging directory for the HF checkpoint and logs")
    ap.add_argument("--corpus", default=sysconfig.get_paths()["stdlib"])
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--val-percent", type=int, default=5)
    ap.add_argument("--steps", type=int, default=1800)
    ap.add_argument("--batch", type=int, default=128, help="sequences per step")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr-frac", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=150)
    ap.add_argument("--wd", type=float, default=0.1)
    ap.add_argument("--bias-gamma", type=float, default=1e-3, help="DeepSeek-V3 bias update speed")
    ap.add_argument("--bias-gamma-warm", type=float, default=1e-2,
                    help="faster bias update during the first --bias-warm-frac of the steps")
    ap.add_argument("--bias-warm-frac", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=200)
    ap.add_argument("--eval-seqs", type=int, default=4000, help="held-out windows for periodic eval (4000 = all)")
    ap.add_argument("--time-limit", type=float, default=400.0, help="stop training after this many s")
    ap.add_argument("--shard-mb", type=float, default=9.5)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--bench", type=int, default=0,
                    help="only time this many steps for each of --bench-variants, then exit")
    ap.add_argument("--bench-variants", default="eager:256,compile:256")
    ap.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole pipeline")
    ap.add_argument("--max-files", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.smoke:
        args.max_files = args.max_files or 80
        args.steps, args.batch, args.seq = 12, 4, 128
        args.log_every, args.eval_every, args.eval_seqs, args.warmup = 3, 6, 8, 3
    if args.threads:
        torch.set_num_threads(args.threads)

    os.makedirs(args.out, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = dev.type == "cuda"
    if amp:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    t0 = time.time()
    summary = {
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "device": torch.cuda.get_device_name(0) if amp else "cpu",
        },
        "args": vars(args),
    }

    # corpus + tokenizer -------------------------------------------------------------------
    train_docs, val_docs = collect_corpus(args.corpus, args.val_percent, args.max_files)
    tb = sum(len(t.encode()) for _, t in train_docs)
    vb = sum(len(t.encode()) for _, t in val_docs)
    print(f"corpus {args.corpus}: {len(train_docs)} train files ({tb/1e6:.1f} MB), "
          f"{len(val_docs)} val files ({vb/1e6:.2f} MB)", flush=True)
    tok = train_tokenizer([t for _, t in train_docs], CONFIG["vocab_size"])
    eot_id = tok.token_to_id(EOT)
    assert eot_id == 0, eot_id
    tok.save(os.path.join(args.out, "tokenizer.json"))
    with open(os.path.join(args.out, "tokenizer_config.json"), "w") as f:
        json.dump(TOKENIZER_CONFIG, f, indent=2)
    train_ids = encode(tok, [t for _, t in train_docs], eot_id)
    val_ids = encode(tok, [t for _, t in val_docs], eot_id)
    print(f"tokenizer: vocab {tok.get_vocab_size()}, train {len(train_ids)/1e6:.2f} M tokens "
          f"({tb/len(train_ids):.2f} bytes/token), val {len(val_ids)/1e6:.3f} M tokens "
          f"[{time.time()-t0:.0f}s]", flush=True)
    summary["corpus"] = {
        "source": f"CPython standard library *.py files ({args.corpus})",
        "licence": "PSF-2.0 (Python Software Foundation License)",
        "train_files": len(train_docs), "val_files": len(val_docs),
        "train_bytes": tb, "val_bytes": vb,
        "train_tokens": int(len(train_ids)), "val_tokens": int(len(val_ids)),
        "val_file_list": [r for r, _ in val_docs],
    }
    summary["tokenizer"] = {"vocab_size": tok.get_vocab_size(), "bytes_per_token": tb / len(train_ids)}

    train_t = torch.from_numpy(train_ids.astype(np.int64)).to(dev)
    val_t = torch.from_numpy(val_ids.astype(np.int64)).to(dev)
    val_x, val_y = windows(val_t, args.seq)
    ev_x, ev_y = val_x[: args.eval_seqs], val_y[: args.eval_seqs]

    if args.bench:
        for variant in args.bench_variants.split(","):
            mode, b = variant.split(":")
            bench(args, train_t, dev, amp, mode == "compile", int(b))
        return

    # model ----------------------------------------------------------------------------------
    model = Glm4MoeTiny(CONFIG).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    n_expert = sum(m.w_gate.numel() * 3 for m in model.moe_layers())
    n_active = n_params - n_expert + n_expert * CONFIG["num_experts_per_tok"] // CONFIG["n_routed_experts"]
    print(f"params {n_params/1e6:.2f} M (routed experts {n_expert/1e6:.2f} M, active/token "
          f"{n_active/1e6:.2f} M); bf16 {n_params*2/1e6:.1f} MB, 4-bit ~{n_params*0.5625/1e6:.1f} MB",
          flush=True)
    summary["params"] = {"total": n_params, "routed_experts": n_expert, "active_per_token": n_active}

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.wd}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8, fused=amp,
    )

    def lr_at(step, elapsed=0.0):
        # cosine over the steps; should --time-limit bind first, progress follows elapsed time so
        # the learning rate still ends annealed (the log records where that happened)
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        prog = (step - args.warmup) / max(1, args.steps - args.warmup)
        prog = min(1.0, max(prog, elapsed / args.time_limit))
        return args.lr * (args.min_lr_frac + (1 - args.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * prog)))

    fwd = torch.compile(model) if args.compile else model
    gen = torch.Generator().manual_seed(args.seed)
    offs = torch.arange(args.seq + 1, device=dev)
    moes = model.moe_layers()

    def batch():
        start = torch.randint(0, train_t.numel() - args.seq - 1, (args.batch,), generator=gen).to(dev)
        chunk = train_t[start[:, None] + offs]
        return chunk[:, :-1], chunk[:, 1:]

    log_path = os.path.join(args.out, "training_log.csv")
    logf = open(log_path, "w", newline="")
    log = csv.writer(logf)
    log.writerow(["step", "tokens", "lr", "train_loss", "val_loss", "max_vio", "elapsed_s"])
    tokens_per_step = args.batch * args.seq
    loss_acc = torch.zeros((), device=dev)
    vio_acc = torch.zeros((), device=dev)
    n_acc = 0
    t_train = time.time()
    step = 0
    stopped_early = False
    elapsed = 0.0
    for step in range(args.steps):
        lr_now = lr_at(step, elapsed)
        for g in opt.param_groups:
            g["lr"] = lr_now
        gamma = args.bias_gamma_warm if step < args.bias_warm_frac * args.steps else args.bias_gamma
        x, y = batch()
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
            loss, counts = fwd(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():  # DeepSeek-V3 auxiliary-loss-free balancing
            mean = counts.mean(dim=1, keepdim=True)
            for m, c, mu in zip(moes, counts, mean):
                b = m.e_score_correction_bias
                b += gamma * torch.sign(mu[0] - c)
                b -= b.min()
            vio_acc += ((counts.max(dim=1).values - mean[:, 0]) / mean[:, 0]).mean()
            loss_acc += loss.detach()
            n_acc += 1
        last = step + 1 == args.steps
        elapsed = time.time() - t_train
        if elapsed > args.time_limit and not last:
            print(f"time limit reached at step {step+1}", flush=True)
            stopped_early = True
            last = True
        if (step + 1) % args.log_every == 0 or last:
            vl = ""
            if (step + 1) % args.eval_every == 0 or last:
                vl = evaluate(model, ev_x, ev_y, args.batch, amp)
            tl = (loss_acc / n_acc).item()
            mv = (vio_acc / n_acc).item()
            log.writerow([step + 1, (step + 1) * tokens_per_step, f"{lr_now:.3e}", f"{tl:.4f}",
                          f"{vl:.4f}" if vl != "" else "", f"{mv:.3f}", f"{elapsed:.1f}"])
            logf.flush()
            print(f"step {step+1:5d} tok {(step+1)*tokens_per_step/1e6:7.1f}M lr {lr_now:.2e} "
                  f"train {tl:.4f} val {vl if vl == '' else f'{vl:.4f}'} maxvio {mv:.2f} "
                  f"[{elapsed:.0f}s]", flush=True)
            loss_acc.zero_(); vio_acc.zero_(); n_acc = 0
        if last:
            break
    logf.close()
    steps_done = step + 1
    train_time = time.time() - t_train
    summary["training"] = {
        "steps": steps_done, "tokens": steps_done * tokens_per_step, "batch": args.batch,
        "seq": args.seq, "seconds": train_time, "stopped_early": stopped_early,
        "epochs": steps_done * tokens_per_step / len(train_ids),
        "balancing": (f"aux-loss-free bias update (DeepSeek-V3): gamma={args.bias_gamma_warm} for the "
                      f"first {args.bias_warm_frac:.0%} of the steps, then {args.bias_gamma}; no aux loss"),
    }

    # round to the shipped precision (bf16 weights, f32 bias), then evaluate -----------------
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    val_loss = evaluate(model, val_x, val_y, args.batch, amp)
    summary["eval"] = {"val_tokens": int(val_y.numel()), "val_loss": val_loss, "val_ppl": math.exp(val_loss),
                       "val_bits_per_byte": val_loss / math.log(2) * len(val_ids) / vb}
    tr_x, tr_y = windows(train_t[: val_t.numel()], args.seq)
    summary["eval"]["train_subset_loss"] = evaluate(model, tr_x, tr_y, args.batch, amp)
    print(f"final (bf16 weights): val loss {val_loss:.4f} ppl {math.exp(val_loss):.2f}; "
          f"train-subset loss {summary['eval']['train_subset_loss']:.4f}", flush=True)
    stats = routing_stats(model, val_x, args.batch, amp, args.seed)
    with open(os.path.join(args.out, "routing_stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    for li, s in stats["layers"].items():
        print(f"layer {li}: entropy {s['freq_entropy_norm']:.3f} top16 {s['top16_share']:.3f} "
              f"reuse1 {s['reuse_prev1']:.3f} (shuffled {s['reuse_prev1_shuffled']:.3f}, uniform "
              f"{stats['uniform']['reuse_prev1']:.4f}) reuse4 {s['reuse_any_prev4']:.3f}", flush=True)

    # export ---------------------------------------------------------------------------------
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(CONFIG, f, indent=2)
    sd = hf_state_dict(model)
    n_shards, total = save_sharded(sd, args.out, int(args.shard_mb * 1e6))
    print(f"saved {len(sd)} tensors, {total/1e6:.2f} MB in {n_shards} shards", flush=True)
    summary["export"] = {"tensors": len(sd), "bytes": total, "shards": n_shards}

    # transformers check + samples ------------------------------------------------------------
    try:
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        summary["versions"]["transformers"] = transformers.__version__
        hf_tok = AutoTokenizer.from_pretrained(args.out)
        try:
            hf = AutoModelForCausalLM.from_pretrained(args.out, dtype=torch.float32)
        except TypeError:
            hf = AutoModelForCausalLM.from_pretrained(args.out, torch_dtype=torch.float32)
        hf = hf.to(dev).eval()
        torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 for the comparison
        xb = val_x[:4]
        with torch.no_grad():
            ref, _ = model.eval()(xb)
            got = hf(xb).logits.float()
            hf_loss = F.cross_entropy(got.view(-1, got.shape[-1]), val_y[:4].reshape(-1)).item()
            my_loss = F.cross_entropy(ref.view(-1, ref.shape[-1]), val_y[:4].reshape(-1)).item()
        diff = (ref - got).abs().max().item()
        summary["hf_check"] = {"max_abs_logit_diff_fp32": diff, "hf_loss": hf_loss, "own_loss": my_loss,
                               "windows": 4}
        print(f"transformers {transformers.__version__} reload: max |logit diff| {diff:.2e}, "
              f"loss {hf_loss:.4f} vs {my_loss:.4f}", flush=True)
        prompts = [
            "import os\nimport sys\n\n\ndef ",
            "class Queue:\n    \"\"\"",
            "def parse_args(argv=None):\n",
            "    def __repr__(self):\n        return ",
            "# Copyright (C) 2001 Python Software Foundation\n\"\"\"",
            "The following functions are provided by this module:",
        ]
        samples = []
        for i, pr in enumerate(prompts):
            ids = hf_tok(pr, return_tensors="pt").input_ids.to(dev)
            torch.manual_seed(args.seed + i)
            with torch.no_grad():
                g = hf.generate(ids, max_new_tokens=96, do_sample=True, temperature=0.8, top_p=0.95,
                                pad_token_id=0)
                gg = hf.generate(ids, max_new_tokens=64, do_sample=False, pad_token_id=0)
            samples.append({"prompt": pr,
                            "sampled_t0.8_p0.95": hf_tok.decode(g[0, ids.shape[1]:]),
                            "greedy": hf_tok.decode(gg[0, ids.shape[1]:])})
            print(f"--- {pr!r}\n{samples[-1]['sampled_t0.8_p0.95']}", flush=True)
        with open(os.path.join(args.out, "samples.json"), "w") as f:
            json.dump(samples, f, indent=2)
    except Exception as e:  # keep the checkpoint even if the check fails
        import traceback

        traceback.print_exc()
        summary["hf_check"] = {"error": repr(e)}
    summary["wall_seconds"] = time.time() - t0
    with open(os.path.join(args.out, "run_summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    print(f"done in {time.time()-t0:.0f}s", flush=True)


if __name__ == "__main__":
    main()
