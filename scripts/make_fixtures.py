#!/usr/bin/env python3
"""Generate tiny random MoE reference fixtures for moe-harness.

Builds small RANDOM checkpoints with Hugging Face transformers (the reference implementation), converts some of
them to MLX 4-bit with mlx-lm's own code, and writes for every fixture under tests/fixtures/models/<name>/:

  config.json                 as the real layout has it (hub spelling, transformers-5 spelling, or mlx-lm output)
  model*.safetensors[.index]  weights (HF per-expert hub keys, or MLX stacked switch_mlp keys)
  reference.safetensors       tensor `logits`: f32 [T, vocab] for the fixed token sequence (HF, float32)
  reference.json              tokens, per-layer routing captured from the HF forward, greedy continuation, versions

Everything is seeded; re-running gives byte-identical weights and references for the same package versions
(pinned in scripts/requirements-fixtures.txt).

Usage:  python scripts/make_fixtures.py [--out tests/fixtures/models] [--only glm4_moe,qwen3_moe,...]
        python scripts/make_fixtures.py --only deepseek_v3,glm4_moe_lite,kimi_k25   (MLA families)
        python scripts/make_fixtures.py --shipped   (references for models/glm4-moe-tiny, no weights copied)
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
torch.set_num_interop_threads(1)

import safetensors  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

transformers.logging.set_verbosity_error()

import mlx.core as mx  # noqa: E402
import mlx_lm  # noqa: E402
from mlx.utils import tree_map, tree_map_with_path  # noqa: E402
from mlx_lm.utils import load_model as mlx_load_model  # noqa: E402
from mlx_lm.utils import quantize_model as mlx_quantize_model  # noqa: E402
from mlx_lm.utils import save_config as mlx_save_config  # noqa: E402
from mlx_lm.utils import save_model as mlx_save_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
T = 12  # reference sequence length
PROMPT_LEN = 4
GEN_LEN = 8
ROUTING_MARGIN = 1e-4  # min gap between k-th and (k+1)-th choice score (and between kept/dropped groups)
GREEDY_MARGIN = 1e-3  # min gap top1 - top2 logit at every greedy step
W_STD = 0.05
NORM_STD = 0.1
BIAS_STD = 0.05
ESCB_STD = 0.1  # e_score_correction_bias
Q_GROUP, Q_BITS = 64, 4

VERSIONS = {
    "python": platform.python_version(),
    "torch": torch.__version__,
    "transformers": transformers.__version__,
    "mlx": mx.__version__,
    "mlx-lm": mlx_lm.__version__,
    "numpy": np.__version__,
    "safetensors": safetensors.__version__,
}

# ----------------------------------------------------------------------------------------------------------------
# Hub-spelling configs (what the original checkpoints on the hub look like)
# ----------------------------------------------------------------------------------------------------------------

GLM_HUB = {
    "architectures": ["Glm4MoeForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "pad_token_id": None,
    "eos_token_id": None,
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 128,
    "partial_rotary_factor": 0.5,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "model_type": "glm4_moe",
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "n_group": 2,
    "topk_group": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "use_qk_norm": True,
    "vocab_size": 256,
}

QWEN_HUB = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "decoder_sparse_step": 1,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "max_window_layers": 3,
    "mlp_only_layers": [0],
    "model_type": "qwen3_moe",
    "moe_intermediate_size": 64,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.001,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "use_sliding_window": False,
    "vocab_size": 256,
}

MIXTRAL_HUB = {
    "architectures": ["MixtralForCausalLM"],
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 64,
    "max_position_embeddings": 4096,
    "model_type": "mixtral",
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "num_local_experts": 8,
    "output_router_logits": False,
    "rms_norm_eps": 1e-05,
    "rope_theta": 1000000.0,
    "router_aux_loss_coef": 0.02,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "vocab_size": 256,
}

LLAMA_HUB = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "max_position_embeddings": 4096,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "vocab_size": 256,
}

QWEN3_NEXT_HUB = {
    "architectures": ["Qwen3NextForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "decoder_sparse_step": 1,
    "full_attention_interval": 2,
    "head_dim": 16,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "linear_conv_kernel_dim": 4,
    "linear_key_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_value_head_dim": 16,
    "max_position_embeddings": 4096,
    "mlp_only_layers": [],
    "model_type": "qwen3_next",
    "moe_intermediate_size": 32,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts": 8,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 4,
    "num_key_value_heads": 2,
    "output_router_logits": False,
    "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000000.0,
    "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 32,
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "vocab_size": 256,
}

# Kimi-Linear-48B-A3B (public config: hidden 2304, 27 layers, KDA 32 heads x 128 with conv 4, MLA without RoPE
# (q_lora_rank null, kv_lora 512, qk_nope 128, qk_rope 64, v_head 128), 256 experts top-8 of moe_intermediate 1024
# + 1 shared, sigmoid router with 1 group, routed_scaling_factor 2.446, first_k_dense_replace 1) scaled down, in
# the hub spelling (linear_attn_config with 1-indexed kda_layers / full_attn_layers, num_experts,
# num_experts_per_token, num_shared_experts, moe_renormalize, num_expert_group, model_max_length). Every dim an MLX
# quantizer sees is a multiple of 64, so mlx-lm's 4-bit conversion quantizes every projection.
KIMI_LINEAR_HUB = {
    "architectures": ["KimiLinearForCausalLM"],
    "model_type": "kimi_linear",
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "head_dim": 72,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "kv_lora_rank": 64,
    "linear_attn_config": {
        "full_attn_layers": [2],
        "head_dim": 64,
        "kda_layers": [1, 3],
        "num_heads": 2,
        "short_conv_kernel_size": 4,
    },
    "mla_use_nope": True,
    "model_max_length": 4096,
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "moe_renormalize": True,
    "moe_router_activation_func": "sigmoid",
    "num_attention_heads": 2,
    "num_expert_group": 1,
    "num_experts": 8,
    "num_experts_per_token": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 2,
    "num_nextn_predict_layers": 0,
    "num_shared_experts": 1,
    "q_lora_rank": None,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "routed_scaling_factor": 2.446,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "use_grouped_topk": True,
    "v_head_dim": 32,
    "vocab_size": 256,
}

FAMILIES = {
    "glm4_moe": {"hub": GLM_HUB, "seed": 1000, "router": "sigmoid_noaux_tc"},
    "qwen3_moe": {"hub": QWEN_HUB, "seed": 2000, "router": "softmax_topk"},
    "mixtral": {"hub": MIXTRAL_HUB, "seed": 3000, "router": "softmax_topk"},
    "llama": {"hub": LLAMA_HUB, "seed": 4000, "router": None},
    "qwen3_next": {"hub": QWEN3_NEXT_HUB, "seed": 8000, "router": "softmax_topk"},
    "kimi_linear": {"hub": KIMI_LINEAR_HUB, "seed": 9000, "router": "sigmoid_noaux_tc"},
}


# ----------------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def load_hf(path: Path, dtype=torch.float32):
    """Load a checkpoint dir with HF transformers, eager attention + eager experts, f32 compute."""
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, attn_implementation="eager", experts_implementation="eager"
    )
    model.eval()
    return model


def build_random_hf(hub_cfg: dict, seed: int):
    """Instantiate an HF model from a hub-spelling config and fill it with seeded random values."""
    with tempfile.TemporaryDirectory() as td:
        write_json(Path(td) / "config.json", hub_cfg)
        cfg = AutoConfig.from_pretrained(td)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(
        cfg, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                p.copy_(1.0 + NORM_STD * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(BIAS_STD * torch.randn(p.shape, generator=g))
            else:
                p.copy_(W_STD * torch.randn(p.shape, generator=g))
        for name, b in sorted(model.named_buffers(), key=lambda kv: kv[0]):
            if name.endswith("e_score_correction_bias"):
                b.copy_(ESCB_STD * torch.randn(b.shape, generator=g))
    model.eval()
    return model


class RouterCapture:
    """Forward hooks on every `mlp.gate` router; records (layer, input, logits, weights, indices) per call."""

    def __init__(self, model):
        self.calls = []
        self.handles = []
        for li, layer in enumerate(model.model.layers):
            gate = getattr(getattr(layer, "mlp", None), "gate", None)
            if gate is not None and isinstance(gate, torch.nn.Module) and not isinstance(gate, torch.nn.Linear):
                self.handles.append(gate.register_forward_hook(self._hook(li)))

    def _hook(self, li):
        def fn(module, inputs, outputs):
            logits, weights, idx = outputs
            self.calls.append(
                {
                    "layer": li,
                    "x": inputs[0].detach().reshape(-1, inputs[0].shape[-1]).clone(),
                    "logits": logits.detach().float().clone(),
                    "weights": weights.detach().float().clone(),
                    "idx": idx.detach().clone(),
                    "module": module,
                }
            )

        return fn

    def reset(self):
        self.calls = []

    def close(self):
        for h in self.handles:
            h.remove()


def check_router_call(call, cfg, router_kind):
    """Independent check of one captured router call: returns (min_margin, n_bias_changed).

    Recomputes the selection from the captured logits with our own code ONLY to (a) measure the tie margin and
    (b) assert that it agrees with what HF selected. Reference routing always comes from the HF outputs.
    """
    logits = call["logits"]
    k = cfg.num_experts_per_tok
    hf_sets = [set(r.tolist()) for r in call["idx"]]
    min_margin = float("inf")
    changed = 0
    if router_kind == "sigmoid_noaux_tc":
        module = call["module"]
        bias = module.e_score_correction_bias.detach().float()
        G, TG = cfg.n_group, cfg.topk_group
        s = logits.sigmoid()

        def select(c):
            nonlocal min_margin
            E = c.shape[-1]
            gs = c.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
            gsorted = gs.sort(dim=-1, descending=True).values
            if G > TG:
                min_margin = min(min_margin, float((gsorted[:, TG - 1] - gsorted[:, TG]).min()))
            gsel = gs.topk(TG, dim=-1).indices
            gmask = torch.zeros_like(gs).scatter_(1, gsel, 1.0).bool()
            emask = gmask.unsqueeze(-1).expand(-1, G, E // G).reshape(-1, E)
            cm = c.masked_fill(~emask, float("-inf"))
            cs = cm.sort(dim=-1, descending=True).values
            gap = cs[:, k - 1] - cs[:, k]
            min_margin = min(min_margin, float(gap.min()))
            return [set(r.tolist()) for r in cm.topk(k, dim=-1).indices]

        mine = select(s + bias)
        saved = min_margin
        nobias = select(s)  # what zero bias would have routed
        min_margin = saved
        changed = sum(1 for a, b in zip(mine, nobias) if a != b)
    else:
        p = torch.softmax(logits, dim=-1)
        ps = p.sort(dim=-1, descending=True).values
        min_margin = float((ps[:, k - 1] - ps[:, k]).min())
        mine = [set(r.tolist()) for r in p.topk(k, dim=-1).indices]
    assert mine == hf_sets, "own recomputation disagrees with HF router selection"
    return min_margin, changed


def run_reference(model, tokens, cfg, router_kind, prompt_len=PROMPT_LEN):
    """Full forward of the T tokens in f32 + greedy generation with KV cache from the first prompt_len tokens.
    Returns dict of results."""
    cap = RouterCapture(model)
    ids = torch.tensor([tokens], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False)
    logits = out.logits[0].float().clone()
    routing, routing_w = {}, {}
    margins = []
    bias_changed = 0
    for call in cap.calls:
        m, ch = check_router_call(call, cfg, router_kind)
        margins.append(m)
        bias_changed += ch
        ids_l, w_l = [], []
        for r_idx, r_w in zip(call["idx"].tolist(), call["weights"].tolist()):
            order = sorted(range(len(r_idx)), key=lambda j: r_idx[j])
            ids_l.append([int(r_idx[j]) for j in order])
            w_l.append([float(r_w[j]) for j in order])
        routing[str(call["layer"])] = ids_l
        routing_w[str(call["layer"])] = w_l
    # greedy with KV cache through HF generate
    cap.reset()
    prompt = tokens[:prompt_len]
    with torch.no_grad():
        # explicit all-ones attention_mask: otherwise generate() infers one from pad_token_id and would mask
        # prompt tokens that happen to equal it
        gen = model.generate(
            torch.tensor([prompt], dtype=torch.long),
            attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
            do_sample=False,
            max_new_tokens=GEN_LEN,
            min_new_tokens=GEN_LEN,
            eos_token_id=None,
            pad_token_id=cfg.vocab_size - 1,
            use_cache=True,
            output_logits=True,
            return_dict_in_generate=True,
        )
    generated = gen.sequences[0, prompt_len:].tolist()
    assert len(generated) == GEN_LEN
    greedy_margin = float("inf")
    for step_logits in gen.logits:
        top2 = step_logits[0].float().topk(2).values
        greedy_margin = min(greedy_margin, float(top2[0] - top2[1]))
    gen_router_margin = float("inf")
    for call in cap.calls:
        m, _ = check_router_call(call, cfg, router_kind)
        gen_router_margin = min(gen_router_margin, m)
    cap.close()
    # cross-check generate() against a no-cache argmax loop
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(GEN_LEN):
            lg = model(input_ids=torch.tensor([seq]), use_cache=False).logits[0, -1]
            seq.append(int(lg.argmax()))
    assert seq[prompt_len:] == generated, (seq, generated)
    return {
        "logits": logits,
        "routing": routing,
        "routing_weights": routing_w,
        "generated": generated,
        "min_routing_margin": min(margins) if margins else None,
        "min_gen_routing_margin": gen_router_margin if cap.calls else None,
        "min_greedy_margin": greedy_margin,
        "bias_changed": bias_changed,
    }


def margins_ok(ref) -> bool:
    ok = ref["min_greedy_margin"] > GREEDY_MARGIN
    for key in ("min_routing_margin", "min_gen_routing_margin"):
        if ref[key] is not None:
            ok = ok and ref[key] > ROUTING_MARGIN
    return ok


def moe_layers(cfg) -> list[int]:
    mt = cfg.model_type
    n = cfg.num_hidden_layers
    if mt == "glm4_moe":
        return [i for i in range(n) if i >= cfg.first_k_dense_replace]
    if mt in ("qwen3_moe", "qwen3_next"):
        return [
            i
            for i in range(n)
            if i not in cfg.mlp_only_layers and cfg.num_experts > 0 and (i + 1) % cfg.decoder_sparse_step == 0
        ]
    if mt == "mixtral":
        return list(range(n))
    if mt == "deepseek_v3":
        return [i for i in range(n) if i >= cfg.first_k_dense_replace]
    if mt in ("glm4_moe_lite", "kimi_linear"):
        return [i for i in range(n) if cfg.mlp_layer_types[i] == "sparse"]
    return []


def dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_reference(out: Path, family, dtype_desc, tokens, ref, notes, extra=None, prompt_len=PROMPT_LEN):
    save_file({"logits": ref["logits"].contiguous()}, str(out / "reference.safetensors"))
    obj = {
        "family": family,
        "dtype": dtype_desc,
        "tokens": tokens,
        "routing": ref["routing"],
        "routing_weights": ref["routing_weights"],
        "greedy": {"prompt": tokens[:prompt_len], "generated": ref["generated"]},
        "versions": VERSIONS,
        "notes": notes,
        "checks": {
            "min_routing_margin": ref["min_routing_margin"],
            "min_generation_routing_margin": ref["min_gen_routing_margin"],
            "min_greedy_logit_margin": ref["min_greedy_margin"],
            "routing_margin_threshold": ROUTING_MARGIN,
            "greedy_margin_threshold": GREEDY_MARGIN,
        },
    }
    if extra:
        obj.update(extra)
    write_json(out / "reference.json", obj)


def verify_reload(path: Path, tokens, expect_logits, tol=1e-5, dtype=torch.float32):
    m = load_hf(path, dtype=dtype)
    with torch.no_grad():
        lg = m(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
    diff = float((lg - expect_logits).abs().max())
    assert diff <= tol, f"{path.name}: reload logits differ by {diff}"
    return diff


# ----------------------------------------------------------------------------------------------------------------
# MTP extra layer (GLM): tensors under model.layers.{num_hidden_layers} that an engine must ignore
# ----------------------------------------------------------------------------------------------------------------


def glm_mtp_tensors(cfg, seed) -> dict:
    g = torch.Generator().manual_seed(seed + 777)
    H, E, I = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    p = f"model.layers.{cfg.num_hidden_layers}"

    def r(*shape, std=W_STD, base=0.0):
        return (base + std * torch.randn(shape, generator=g)).float()

    return {
        f"{p}.eh_proj.weight": r(H, 2 * H),
        f"{p}.enorm.weight": r(H, std=NORM_STD, base=1.0),
        f"{p}.hnorm.weight": r(H, std=NORM_STD, base=1.0),
        f"{p}.shared_head.norm.weight": r(H, std=NORM_STD, base=1.0),
        f"{p}.input_layernorm.weight": r(H, std=NORM_STD, base=1.0),
        f"{p}.post_attention_layernorm.weight": r(H, std=NORM_STD, base=1.0),
        f"{p}.mlp.gate.weight": r(E, H),
        f"{p}.mlp.gate.e_score_correction_bias": r(E, std=ESCB_STD),
        f"{p}.mlp.experts.0.gate_proj.weight": r(I, H),
        f"{p}.mlp.experts.0.up_proj.weight": r(I, H),
        f"{p}.mlp.experts.0.down_proj.weight": r(H, I),
    }


# ----------------------------------------------------------------------------------------------------------------
# MLX conversion + numpy dequantization
# ----------------------------------------------------------------------------------------------------------------


def mlx_convert_4bit(src: Path, dst: Path) -> dict:
    """Replicates `mlx_lm.convert(hf_path=src, mlx_path=dst, quantize=True, q_group_size=64, q_bits=4,
    dtype="bfloat16")` with mlx-lm's own functions (convert() itself insists on a tokenizer, which these tiny
    fixtures do not have): load_model -> cast floats to bf16 (model.cast_predicate) -> quantize_model (with the
    model's quant_predicate) -> save_model -> save_config."""
    model, config = mlx_load_model(src, lazy=False)
    dtype = mx.bfloat16
    cast_predicate = getattr(model, "cast_predicate", lambda _: True)

    def set_dtype(k, v):
        if cast_predicate(k) and mx.issubdtype(v.dtype, mx.floating):
            return v.astype(dtype)
        return v

    model.update(tree_map_with_path(set_dtype, model.parameters()))
    model, config = mlx_quantize_model(model, config, Q_GROUP, Q_BITS, mode="affine")
    mlx_save_model(dst, model)
    mlx_save_config(config, config_path=dst / "config.json")
    return config


def mlx_tensors_as_numpy(path: Path) -> dict:
    arrs = {}
    for f in sorted(path.glob("model*.safetensors")):
        for k, v in mx.load(str(f)).items():
            arrs[k] = v
    out = {}
    for k, v in arrs.items():
        if v.dtype == mx.uint32:
            out[k] = (np.array(v), "uint32", v)
        else:
            out[k] = (np.array(v.astype(mx.float32)), str(v.dtype).replace("mlx.core.", ""), v)
    return out


def np_dequantize(wq: np.ndarray, scales: np.ndarray, biases: np.ndarray, group_size: int, bits: int) -> np.ndarray:
    """w = scales * q + biases (float32); element j of a uint32 word sits at bits j*bits .. j*bits+bits (LSB first)."""
    per = 32 // bits
    mask = np.uint32((1 << bits) - 1)
    shifts = (np.arange(per, dtype=np.uint32) * np.uint32(bits)).astype(np.uint32)
    q = (wq[..., None] >> shifts) & mask  # [..., out, in/per, per]
    q = q.reshape(*wq.shape[:-1], wq.shape[-1] * per).astype(np.float32)
    n_in = q.shape[-1]
    qg = q.reshape(*q.shape[:-1], n_in // group_size, group_size)
    w = scales.astype(np.float32)[..., None] * qg + biases.astype(np.float32)[..., None]
    return w.reshape(*q.shape[:-1], n_in).astype(np.float32)


def mlx_to_hf_f32(mlx_dir: Path, qcfg: dict, hub_cfg: dict, hf_dir: Path) -> dict:
    """Dequantize an MLX checkpoint in float32 (numpy) and write it as an HF hub-layout f32 checkpoint.
    Returns info about quantized tensors (dtypes, shapes, cross-check errors)."""
    t = mlx_tensors_as_numpy(mlx_dir)
    default = qcfg["quantization"]
    info = {"quantized_modules": {}, "unquantized": {}, "max_rel_err_vs_mx_dequantize": 0.0}
    dense = {}
    bases = sorted({k[: -len(".scales")] for k in t if k.endswith(".scales")})
    for base in bases:
        wq, wdt, wmx = t[base + ".weight"]
        sc, sdt, smx = t[base + ".scales"]
        bi, bdt, bmx = t[base + ".biases"]
        params = qcfg["quantization"].get(base, default)
        gs, bits = params["group_size"], params["bits"]
        assert wdt == "uint32"
        w = np_dequantize(wq, sc, bi, gs, bits)
        ref = np.array(mx.dequantize(wmx, smx, bmx, group_size=gs, bits=bits, mode="affine").astype(mx.float32))
        scale = float(np.abs(w).max()) + 1e-12
        rel = float(np.abs(ref - w).max()) / scale
        assert rel < 2.0**-7, f"numpy dequant vs mx.dequantize mismatch on {base}: {rel}"
        info["max_rel_err_vs_mx_dequantize"] = max(info["max_rel_err_vs_mx_dequantize"], rel)
        info["quantized_modules"][base] = {
            "bits": bits,
            "group_size": gs,
            "weight": [list(wq.shape), wdt],
            "scales": [list(sc.shape), sdt],
            "biases": [list(bi.shape), bdt],
        }
        dense[base + ".weight"] = w
    for k, (arr, dt, _) in t.items():
        if any(k == b + s for b in bases for s in (".weight", ".scales", ".biases")):
            continue
        dense[k] = arr.astype(np.float32)
        info["unquantized"][k] = [list(arr.shape), dt]
    # MLA (deepseek_v3 & co): mlx-lm split kv_b_proj into per-head embed_q [H, C, dn] and unembed_out [H, dv, C];
    # rebuild kv_b_proj [H*(dn+dv), C] (head h: rows = embed_q[h]^T then unembed_out[h]) from the dequantized values
    for k in sorted(k for k in dense if k.endswith(".self_attn.embed_q.weight")):
        pre = k[: -len("embed_q.weight")]
        wk = dense.pop(k)
        wv = dense.pop(pre + "unembed_out.weight")
        dense[pre + "kv_b_proj.weight"] = np.concatenate([np.swapaxes(wk, -1, -2), wv], axis=1).reshape(
            -1, wk.shape[1]
        )
    # qwen3_next: mlx-lm's sanitize shifted the zero-centred norms by +1 and moved the conv1d kernel axis
    # ([C, 1, K] -> [C, K, 1]); undo both so that the HF model computes with exactly the stored values
    if hub_cfg.get("model_type") == "qwen3_next":
        shifted = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                   ".q_norm.weight", ".k_norm.weight")
        for k in list(dense):
            if any(k.endswith(s) for s in shifted) and dense[k].ndim == 1:
                dense[k] = dense[k] - np.float32(1.0)
            if k.endswith("conv1d.weight") and dense[k].shape[-1] == 1:
                dense[k] = np.ascontiguousarray(np.swapaxes(dense[k], 1, 2))
    # kimi_linear: mlx-lm's sanitize renamed block_sparse_moe to mlp (the router bias to mlp.e_score_correction_bias)
    # and the q/k/v_conv1d kernels [C, 1, K] to q/k/v_conv.conv [C, K, 1]; map both back to the hub keys
    if hub_cfg.get("model_type") == "kimi_linear":
        moe = set(range(hub_cfg["first_k_dense_replace"], hub_cfg["num_hidden_layers"]))
        for k in list(dense):
            v = dense.pop(k)
            for c in ("q", "k", "v"):
                if k.endswith(f".self_attn.{c}_conv.conv.weight"):
                    k = k.replace(f".{c}_conv.conv.weight", f".{c}_conv1d.weight")
                    v = np.ascontiguousarray(np.swapaxes(v, 1, 2))
            parts = k.split(".")
            if len(parts) > 4 and parts[:2] == ["model", "layers"] and int(parts[2]) in moe and parts[3] == "mlp":
                rest = ".".join(parts[4:])
                if rest == "e_score_correction_bias":
                    rest = "gate.e_score_correction_bias"
                k = ".".join(parts[:3] + ["block_sparse_moe", rest])
            dense[k] = v
    # un-stack experts back to hub per-expert keys
    hf = {}
    for k, v in dense.items():
        if ".switch_mlp." in k:
            pre, post = k.split(".switch_mlp.")
            proj = post.split(".")[0]
            for e in range(v.shape[0]):
                if "block_sparse_moe" in pre:
                    wname = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}[proj]
                    hf[f"{pre}.experts.{e}.{wname}.weight"] = torch.from_numpy(np.ascontiguousarray(v[e]))
                else:
                    hf[f"{pre}.experts.{e}.{proj}.weight"] = torch.from_numpy(np.ascontiguousarray(v[e]))
        else:
            hf[k] = torch.from_numpy(np.ascontiguousarray(v))
    hf_dir.mkdir(parents=True, exist_ok=True)
    save_file(hf, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    write_json(hf_dir / "config.json", hub_cfg)
    return info


def mlx_logits(mlx_dir: Path, tokens, f32: bool = False) -> np.ndarray:
    """mlx-lm's own forward of the saved MLX checkpoint. f32=True upcasts every floating parameter (scales,
    biases, norms, unquantized weights) to float32 first, so it must match the HF float32 reference closely."""
    model, _ = mlx_load_model(mlx_dir, lazy=False)
    if f32:
        model.update(
            tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v, model.parameters())
        )
    out = model(mx.array([tokens]))
    return np.array(out[0].astype(mx.float32))


# ----------------------------------------------------------------------------------------------------------------
# per-family generation
# ----------------------------------------------------------------------------------------------------------------


def shard_glm(model, cfg, extra: dict, out: Path):
    """save_pretrained with a small max_shard_size; the MTP tensors are appended to the state dict so they land in
    the last shard, as in the real GLM checkpoints."""
    sd = dict(model.state_dict())
    sd.update(extra)
    model.save_pretrained(str(out), state_dict=sd, max_shard_size="1MB")


def kimi_dense_mlp_keys(d: Path, hub: dict):
    """transformers' save_pretrained reverts its `.block_sparse_moe.` -> `.mlp.` renaming on EVERY layer, so it
    writes the dense layers' MLP under block_sparse_moe too; the hub checkpoint (Moonshot's modeling code, mlx-lm's
    sanitize) keeps dense layers under `mlp.`. Rewrite those keys to the hub layout."""
    f = d / "model.safetensors"
    sd = load_file(str(f))
    dense = range(hub["first_k_dense_replace"])
    out = {}
    for k, v in sd.items():
        for i in dense:
            k = k.replace(f"model.layers.{i}.block_sparse_moe.", f"model.layers.{i}.mlp.")
        out[k] = v
    save_file(dict(sorted(out.items())), str(f), metadata={"format": "pt"})


def family_tokens(seed, vocab):
    rng = np.random.RandomState(seed)
    return [int(x) for x in rng.randint(0, vocab, size=T)]


def make_family(family: str, out_root: Path, summary: list):
    spec = FAMILIES[family]
    hub = spec["hub"]
    router = spec["router"]
    for attempt in range(40):
        seed = spec["seed"] + attempt
        staging = Path(tempfile.mkdtemp(prefix=f"fx_{family}_"))
        try:
            ok, produced = try_family(family, hub, router, seed, staging)
        except AssertionError as e:
            print(f"[{family}] seed {seed}: assertion {e}; reseeding")
            ok, produced = False, []
        if ok:
            for name, meta in produced:
                dst = out_root / name
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(staging / name, dst)
                for f in dst.iterdir():
                    f.chmod(0o644)
                summary.append((name, dir_size(dst), meta))
            shutil.rmtree(staging)
            print(f"[{family}] done with seed {seed}")
            return
        shutil.rmtree(staging)
    raise SystemExit(f"{family}: no seed passed the margin checks")


def common_notes(cfg):
    return (
        "Random tiny model generated by scripts/make_fixtures.py. Weights: normal(0, 0.05); RMSNorm weights 1 + "
        "normal(0, 0.1); attention biases normal(0, 0.05); e_score_correction_bias normal(0, 0.1) (GLM). Reference "
        "computed with HF transformers in float32, attn_implementation=eager, experts_implementation=eager. "
        "routing[layer][t] = expert ids chosen for token t (sorted ascending), captured by a forward hook on the "
        "HF router module (mlp.gate); routing_weights are the HF router's weights for those ids (same order). "
        f"MoE layers: {moe_layers(cfg)}. Greedy: HF generate(do_sample=False) with KV cache from the first "
        f"{PROMPT_LEN} tokens, cross-checked with a no-cache argmax loop."
    )


def try_family(family, hub, router, seed, staging: Path):
    produced = []
    tokens = family_tokens(seed, hub["vocab_size"])
    model = build_random_hf(hub, seed)
    cfg = model.config

    # ---------------- f32 (hub config spelling) ----------------
    if family == "glm4_moe":
        name32 = "glm4_moe-f32-sharded"
    elif family == "llama":
        name32 = "llama-dense"
    else:
        name32 = f"{family}-f32"
    d32 = staging / name32
    ref32 = run_reference(model, tokens, cfg, router)
    if not margins_ok(ref32):
        print(f"[{family}] seed {seed}: f32 margins too small {ref32['min_routing_margin']}, "
              f"{ref32['min_gen_routing_margin']}, {ref32['min_greedy_margin']}")
        return False, []
    if family == "kimi_linear" and (ref32["bias_changed"] == 0 or not mla_ok(ref32)):
        print(f"[{family}] seed {seed}: bias changes {ref32['bias_changed']} sets, greedy {ref32['generated']}; reseeding")
        return False, []
    if family == "glm4_moe":
        if ref32["bias_changed"] == 0:
            print(f"[{family}] seed {seed}: e_score_correction_bias changes no routing decision; reseeding")
            return False, []
        extra = glm_mtp_tensors(cfg, seed)
        shard_glm(model, cfg, extra, d32)
        assert (d32 / "model.safetensors.index.json").exists()
        assert len(list(d32.glob("model-*.safetensors"))) >= 2
    else:
        model.save_pretrained(str(d32))
    if family == "kimi_linear":
        kimi_dense_mlp_keys(d32, hub)
    t5_cfg32 = json.load(open(d32 / "config.json"))
    write_json(d32 / "config.json", hub)  # hub spelling on disk
    (d32 / "generation_config.json").unlink(missing_ok=True)
    diff = verify_reload(d32, tokens, ref32["logits"], tol=1e-5)
    notes = common_notes(cfg) + " Config in hub (original) spelling: top-level rope_theta"
    if family == "glm4_moe":
        notes += (
            ", partial_rotary_factor. Saved sharded by HF save_pretrained(max_shard_size='1MB'); transformers "
            "5.24 save_pretrained already writes hub per-expert keys (revert_weight_conversion), no manual "
            f"conversion. Extra MTP-style tensors under model.layers.{cfg.num_hidden_layers}.* (index == "
            "num_hidden_layers, incl. a gate and expert 0) are in the last shard and MUST be ignored. "
            f"routing_weights include routed_scaling_factor={cfg.routed_scaling_factor}. The nonzero "
            f"e_score_correction_bias changes {ref32['bias_changed']} (token, layer) expert sets vs zero bias."
        )
    elif family == "qwen3_moe":
        notes += ", num_experts (hub spelling; transformers 5 would write num_local_experts)."
    elif family == "qwen3_next":
        notes += (
            ", partial_rotary_factor, full_attention_interval (layer types linear, full, linear, full). Hybrid: "
            "gated DeltaNet linear_attn layers (in_proj_qkvz/in_proj_ba grouped per key head, depthwise conv1d "
            "kernel 4 + SiLU, gated delta rule, gated RMSNorm) and gated full attention (q_proj doubled: per head "
            "query then output gate; zero-centred q/k norms); sigmoid-gated shared expert. Zero-centred RMSNorms "
            "(scale 1 + weight) store 1 + normal(0, 0.1) like every norm here. HF prefill runs the chunked delta "
            "rule, decode the recurrent one."
        )
    elif family == "kimi_linear":
        notes += (
            "; linear_attn_config {kda_layers, full_attn_layers} 1-indexed (layers 0, 2 KDA; 1 MLA), num_experts, "
            "num_experts_per_token, num_shared_experts, moe_renormalize, num_expert_group, model_max_length, "
            "mla_use_nope true. Hybrid: Kimi Delta Attention self_attn layers (q/k/v_proj, separate depthwise "
            "q/k/v_conv1d [C, 1, K] + SiLU, per-channel forget gate g = -exp(A_log)*softplus(f_b_proj(f_a_proj(x)) "
            "+ dt_bias) with A_log [1, 1, H, 1] and dt_bias [H*d], beta = sigmoid(b_proj(x)), L2-normalised q/k, "
            "o_norm = RMSNorm(o)*sigmoid(g_b_proj(g_a_proj(x))), o_proj) and MLA self_attn layers WITHOUT RoPE "
            "(q_proj, kv_a_proj_with_mqa, kv_a_layernorm eps 1e-6, kv_b_proj; softmax scale qk_head_dim^-0.5; the "
            "qk_rope part is an unrotated shared key). Layer 0 dense (mlp.*), MoE layers under block_sparse_moe "
            "with experts.{e}.w1/w2/w3, gate.weight + gate.e_score_correction_bias (sigmoid noaux_tc, one group), "
            "shared_experts.*: written by HF save_pretrained (revert_weight_conversion), except that the dense layer's "
            "MLP is moved back to mlp.* as the hub checkpoint has it (transformers writes it under "
            "block_sparse_moe.*, as the bf16 fixture keeps). HF prefill runs the "
            f"chunked KDA, decode the recurrent one. routing_weights include routed_scaling_factor="
            f"{cfg.routed_scaling_factor}. The nonzero e_score_correction_bias changes {ref32['bias_changed']} "
            "(token, layer) expert sets vs zero bias."
        )
    elif family == "mixtral":
        notes += "; hub keys block_sparse_moe.experts.{e}.w1/w2/w3 + block_sparse_moe.gate (written by HF save)."
    else:
        notes += ". Dense model: no experts; the engine must refuse it."
    notes += f" HF reload max |logit diff| = {diff:.3g}."
    ref32["bias_changed"] = ref32.get("bias_changed", 0)
    write_reference(d32, family, "float32", tokens, ref32, notes,
                    extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "hf"})
    produced.append((name32, {"ref": ref32, "config_keys": sorted(hub.keys())}))

    if family == "llama":
        return True, produced

    # ---------------- bf16 (transformers-5 re-serialisation) ----------------
    if family in ("glm4_moe", "qwen3_moe", "qwen3_next", "kimi_linear"):
        name16 = f"{family}-bf16"
        d16 = staging / name16
        m16 = AutoModelForCausalLM.from_pretrained(str(d32), dtype=torch.bfloat16)
        m16.save_pretrained(str(d16))  # config.json in transformers-5 spelling, single model.safetensors
        (d16 / "generation_config.json").unlink(missing_ok=True)
        del m16
        assert (d16 / "model.safetensors").exists() and not (d16 / "model.safetensors.index.json").exists()
        ref_model16 = load_hf(d16, dtype=torch.float32)  # bf16 weights upcast to f32
        ref16 = run_reference(ref_model16, tokens, ref_model16.config, router)
        if not margins_ok(ref16):
            print(f"[{family}] seed {seed}: bf16 margins too small; reseeding")
            return False, []
        dts = {}
        with safe_open(str(d16 / "model.safetensors"), "pt") as f:
            for k in f.keys():
                dts.setdefault(f.get_slice(k).get_dtype(), []).append(k)
        notes16 = common_notes(cfg) + (
            " Written by HF: from_pretrained(<f32 fixture>, dtype=bfloat16).save_pretrained(): transformers-5 config "
            "spelling (rope_parameters {rope_theta, rope_type, partial_rotary_factor}, dtype, "
            + ("n_routed_experts, num_nextn_predict_layers" if family == "glm4_moe" else "num_local_experts")
            + "). Reference: the bf16 weights loaded and upcast to float32."
        )
        if family == "glm4_moe":
            notes16 += (
                " HF keeps mlp.gate.weight and e_score_correction_bias in F32 (_keep_in_fp32_modules_strict): "
                "mixed-dtype checkpoint. The MTP tensors of the source are dropped by HF (not written)."
                f" routing_weights include routed_scaling_factor={cfg.routed_scaling_factor}."
            )
        tensor_dtypes = {dt: len(v) for dt, v in dts.items()}
        f32_keys = sorted(dts.get("F32", []))
        write_reference(d16, family, "bfloat16", tokens, ref16, notes16,
                        extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "hf",
                               "tensor_dtype_counts": tensor_dtypes, "f32_tensors": f32_keys})
        produced.append((name16, {"ref": ref16}))

    # ---------------- mlx 4-bit ----------------
    name4 = f"{family}-mlx4"
    d4 = staging / name4
    qcfg = mlx_convert_4bit(d32, d4)
    hf_tmp = staging / "_hf_dequant"
    info = mlx_to_hf_f32(d4, qcfg, hub, hf_tmp)
    ref_model4 = load_hf(hf_tmp, dtype=torch.float32)
    ref4 = run_reference(ref_model4, tokens, ref_model4.config, router)
    shutil.rmtree(hf_tmp)
    if not margins_ok(ref4):
        print(f"[{family}] seed {seed}: mlx4 margins too small; reseeding")
        return False, []
    ml32 = mlx_logits(d4, tokens, f32=True)
    mlx32_diff = float(np.abs(ml32 - ref4["logits"].numpy()).max())
    assert mlx32_diff < 1e-3, f"mlx-lm f32 forward disagrees with the dequantized HF reference: {mlx32_diff}"
    try:
        ml = mlx_logits(d4, tokens)
    except RuntimeError as e:  # mlx's CPU backend has no bf16 gather_mm (Linux mlx-cpu)
        print(f"[{family}] native bf16 mlx-lm forward not run: {e}")
        ml = ml32
    mlx_diff = float(np.abs(ml - ref4["logits"].numpy()).max())
    argmax_agree = int((ml.argmax(-1) == ref4["logits"].numpy().argmax(-1)).sum())
    notes4 = common_notes(cfg) + (
        " Converted with mlx-lm's own code (equivalent to mlx_lm.convert --dtype bfloat16 -q --q-group-size 64 "
        "--q-bits 4): load_model(<f32 hub fixture>) -> cast floats to bf16 (cast_predicate) -> quantize_model "
        "-> save_model/save_config. Reference: HF float32 model whose weights are the numpy float32 dequantized "
        "values scales*q+biases (cross-checked vs mx.dequantize), unquantized tensors = stored values upcast. "
        f"mlx-lm's own forward with all float params upcast to f32 matches the reference to {mlx32_diff:.3g} "
        f"(asserted < 1e-3); its native bf16 forward differs by max |logit diff| {mlx_diff:.3g} "
        f"(argmax agrees on {argmax_agree}/{T} positions), informational only. Quantized linears with a bias "
        "(GLM q/k/v) store BOTH `.bias` (the Linear bias) and `.biases` (quantization offsets)."
    )
    if family == "glm4_moe":
        notes4 += (
            " mlx-lm's sanitize dropped the MTP layer; the router gate (MoEGate) is not quantized (bf16 weight, f32 "
            f"e_score_correction_bias). routing_weights include routed_scaling_factor={cfg.routed_scaling_factor}."
        )
    elif family == "qwen3_moe":
        notes4 += " qwen3_moe quant_predicate quantizes every mlp.gate router at 8 bits (per-module override in config)."
    elif family == "qwen3_next":
        notes4 += (
            " qwen3_next quant_predicate quantizes mlp.gate and mlp.shared_expert_gate at 8 bits; linear_attn "
            "in_proj_qkvz/in_proj_ba/out_proj are 4-bit, conv1d stays bf16 as [C, K, 1]. mlx-lm's sanitize stores "
            "the zero-centred norms (input/post_attention layernorms, model.norm, q_norm, k_norm) shifted by +1: "
            "the MLX checkpoint's norm weights are the plain scales (the reference un-shifts them to run HF)."
        )
    elif family == "kimi_linear":
        notes4 += (
            " mlx-lm's kimi_linear sanitize renames the MoE module block_sparse_moe -> mlp (experts stacked in "
            "mlp.switch_mlp.{gate,up,down}_proj, router mlp.gate quantized at 8 bits by its quant_predicate, bias "
            "moved to mlp.e_score_correction_bias, f32), the conv kernels q/k/v_conv1d [C, 1, K] -> "
            "self_attn.q/k/v_conv.conv.weight [C, K, 1] (bf16, not quantized), and kv_b_proj -> embed_q / "
            "unembed_out; A_log and dt_bias stay f32. mlx-lm's MLA uses rms_norm_eps for kv_a_layernorm where HF "
            "uses 1e-6: the reference is HF."
        )
    elif family == "mixtral":
        notes4 += " mixtral has no quant_predicate: router block_sparse_moe.gate is 4-bit."
    write_reference(d4, family, "mlx-affine-4bit-g64", tokens, ref4, notes4,
                    extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "mlx",
                           "quantization": info, "mlx_lm_logits_max_abs_diff": mlx_diff,
                           "mlx_lm_f32_logits_max_abs_diff": mlx32_diff,
                           "mlx_lm_argmax_agree": argmax_agree})
    produced.append((name4, {"ref": ref4, "quant": info}))
    return True, produced


# ----------------------------------------------------------------------------------------------------------------
# MLA families (issue 3): deepseek_v3, glm4_moe_lite, kimi_k25 (wrapping a kimi_k2 / deepseek_v3 text config)
# ----------------------------------------------------------------------------------------------------------------

# DeepSeek-V3 shape ratios scaled down; every dim an MLX quantizer sees is a multiple of 64 so that mlx_lm's 4-bit
# conversion quantizes all projections (as in the real model): q_lora 64, kv_lora 64 (embed_q/unembed_out groups),
# qk_nope 64 (embed_q quantizes along dn), moe_intermediate 64.
DSV3_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": None,
    "eos_token_id": None,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "kv_lora_rank": 64,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "n_group": 2,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "float32",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "v_head_dim": 32,
    "vocab_size": 256,
}

# the other attention branches: plain q_proj (q_lora_rank null, as DeepSeek-V2-Lite), rope_interleave false
# (NEOX rotate_half), default RoPE; 4 groups of 2 experts, 2 kept. Written by HF save_pretrained from bf16, so the
# config is in transformers-5 spelling (rope_parameters, head_dim == qk_rope_head_dim, qk_head_dim).
DSV3_QPROJ_HUB = {
    **{k: v for k, v in DSV3_HUB.items() if k not in ("rope_scaling",)},
    "q_lora_rank": None,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "kv_lora_rank": 48,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 24,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
    "rope_interleave": False,
    "n_group": 4,
    "topk_group": 2,
    "num_nextn_predict_layers": 0,
}

# GLM-4.7-Flash (public config: hidden 2048, 47 layers, 20 heads, q_lora 768, kv_lora 512, qk_nope 192, qk_rope 64,
# v_head 256, 64 experts top-4, n_group 1) scaled down; v_head_dim > qk_nope_head_dim as in the real model.
GLM_LITE_HUB = {
    "architectures": ["Glm4MoeLiteForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "pad_token_id": None,
    "eos_token_id": None,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 64,
    "kv_lora_rank": 64,
    "max_position_embeddings": 202752,
    "model_type": "glm4_moe_lite",
    "moe_intermediate_size": 32,
    "n_group": 2,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 1,
    "partial_rotary_factor": 1.0,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 48,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "routed_scaling_factor": 1.8,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "dtype": "bfloat16",
    "transformers_version": transformers.__version__,
    "use_cache": True,
    "v_head_dim": 64,
    "vocab_size": 256,
}

# Kimi-K2.5 text config (public copies: kimi_k2, 61 layers, 64 heads, q_lora 1536, kv_lora 512, nope 128, rope 64,
# v 128, 384 experts top-8, n_group 1, first_k_dense_replace 1, routed_scaling 2.827, rope_theta 50000, yarn factor
# 64 with beta_fast = beta_slow = 1, rms_norm_eps 1e-5, num_nextn_predict_layers 0) scaled down.
KIMI_TEXT_HUB = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": None,
    "eos_token_id": None,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 64,
    "initializer_range": 0.02,
    "intermediate_size": 128,
    "kv_lora_rank": 64,
    "max_position_embeddings": 262144,
    "model_type": "kimi_k2",
    "moe_intermediate_size": 64,
    "moe_layer_freq": 1,
    "n_group": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 4,
    "num_experts_per_tok": 2,
    "num_hidden_layers": 3,
    "num_key_value_heads": 4,
    "num_nextn_predict_layers": 0,
    "pretraining_tp": 1,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 1.0,
        "beta_slow": 1.0,
        "factor": 64.0,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 50000.0,
    "routed_scaling_factor": 2.827,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 1,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 32,
    "vocab_size": 256,
}

KIMI_VISION = {  # real-config field names (vt_*), tiny sizes; the fixture's vision tensors follow them
    "init_pos_emb_height": 4,
    "init_pos_emb_time": 2,
    "init_pos_emb_width": 4,
    "merge_kernel_size": [2, 2],
    "merge_type": "sd2_tpool",
    "mm_hidden_size": 16,
    "mm_projector_type": "patchmerger",
    "patch_size": 14,
    "pos_emb_type": "divided_fixed",
    "projector_hidden_act": "gelu",
    "projector_ln_eps": 1e-05,
    "text_hidden_size": 64,
    "video_attn_type": "spatial_temporal",
    "vt_hidden_size": 16,
    "vt_intermediate_size": 32,
    "vt_num_attention_heads": 2,
    "vt_num_hidden_layers": 1,
}

KIMI_WRAPPER = {
    "architectures": ["KimiK25ForConditionalGeneration"],
    "model_type": "kimi_k25",
    "bos_token_id": None,
    "eos_token_id": None,
    "pad_token_id": None,
    "media_placeholder_token_id": 255,
    "ignore_index": -100,
    "use_unified_vision_chunk": True,
    "video_placeholder": "<|kimi_k25_video_placeholder|>",
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": transformers.__version__,
    "text_config": KIMI_TEXT_HUB,
    "vision_config": KIMI_VISION,
}

MLA_FAMILIES = {"deepseek_v3": 5000, "glm4_moe_lite": 6000, "kimi_k25": 7000}


def mla_info(model) -> dict:
    """RoPE / softmax-scale constants exactly as the HF modules computed them (debugging aid for ports)."""
    cfg = model.config
    rot = model.model.rotary_emb
    at = model.model.layers[0].self_attn
    return {
        "qk_head_dim": cfg.qk_nope_head_dim + cfg.qk_rope_head_dim,
        "rope_interleave": bool(cfg.rope_interleave),
        "rope_type": cfg.rope_parameters.get("rope_type", "default"),
        "rope_inv_freq": [float(x) for x in rot.inv_freq.tolist()],
        "rope_attention_scaling": float(rot.attention_scaling),
        "softmax_scale": float(at.scaling),
        "q_a_layernorm_eps": float(at.q_a_layernorm.variance_epsilon) if at.q_a_layernorm is not None else None,
        "kv_a_layernorm_eps": float(at.kv_a_layernorm.variance_epsilon),
        "rms_norm_eps": float(cfg.rms_norm_eps),
    }


def mla_mtp_tensors(cfg, seed, dtype=torch.float32) -> dict:
    """MTP-style tensors under model.layers.{num_hidden_layers} (DeepSeek-V3 layer 61 / GLM-4.7-Flash layer 47
    analogue): eh_proj, enorm, hnorm, shared_head.norm, layer norms, part of the MLA attention, the router and
    expert 0 (the real MTP layers hold a full decoder layer plus embed_tokens and shared_head.head [V, D]; left out
    to keep the fixtures small).
    An engine must ignore them."""
    g = torch.Generator().manual_seed(seed + 777)
    D, E, Im = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size
    dr, C = cfg.qk_rope_head_dim, cfg.kv_lora_rank
    p = f"model.layers.{cfg.num_hidden_layers}"

    def r(*shape, std=W_STD, base=0.0):
        return (base + std * torch.randn(shape, generator=g)).to(dtype)

    t = {
        f"{p}.eh_proj.weight": r(D, 2 * D),
        f"{p}.enorm.weight": r(D, std=NORM_STD, base=1.0),
        f"{p}.hnorm.weight": r(D, std=NORM_STD, base=1.0),
        f"{p}.shared_head.norm.weight": r(D, std=NORM_STD, base=1.0),
        f"{p}.input_layernorm.weight": r(D, std=NORM_STD, base=1.0),
        f"{p}.post_attention_layernorm.weight": r(D, std=NORM_STD, base=1.0),
        f"{p}.self_attn.kv_a_proj_with_mqa.weight": r(C + dr, D),
        f"{p}.self_attn.kv_a_layernorm.weight": r(C, std=NORM_STD, base=1.0),
        f"{p}.mlp.gate.weight": r(E, D),
        f"{p}.mlp.gate.e_score_correction_bias": (ESCB_STD * torch.randn((E,), generator=g)).float(),
        f"{p}.mlp.experts.0.gate_proj.weight": r(Im, D),
        f"{p}.mlp.experts.0.up_proj.weight": r(Im, D),
        f"{p}.mlp.experts.0.down_proj.weight": r(D, Im),
    }
    return t


def hub_state_dict(model) -> dict:
    """The hub per-expert key layout, as transformers' save_pretrained writes it (revert_weight_conversion)."""
    with tempfile.TemporaryDirectory() as td:
        model.save_pretrained(td)
        out = {}
        for f in sorted(Path(td).glob("model*.safetensors")):
            out.update(load_file(str(f)))
    return out


def to_bf16_hub(sd: dict) -> dict:
    """bf16 checkpoint as the real ones store it: everything bf16 except e_score_correction_bias (f32)."""
    return {
        k: (v.float() if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)).contiguous()
        for k, v in sd.items()
    }


def save_sharded(tensors: dict, out: Path, shards: list[list[str]], metadata=None):
    """Write `tensors` into len(shards) files model-0000i-of-0000n.safetensors (+ index.json)."""
    n = len(shards)
    weight_map, total = {}, 0
    assert sorted(k for sh in shards for k in sh) == sorted(tensors), "shards must partition the tensors"
    for i, keys in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
        save_file({k: tensors[k] for k in keys}, str(out / fname), metadata=metadata or {"format": "pt"})
        for k in keys:
            weight_map[k] = fname
            total += tensors[k].numel() * tensors[k].element_size()
    write_json(out / "model.safetensors.index.json",
               {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})


def kimi_vision_tensors(seed) -> dict:
    """Tiny vision tower + projector under the real Kimi-K2.5 key names (see transformers' kimi_k25
    conversion_mapping sources and mlx-lm kimi_k25.sanitize). Never used by a text engine."""
    g = torch.Generator().manual_seed(seed + 999)
    v = KIMI_VISION
    Dv, Iv, P, Dt = v["vt_hidden_size"], v["vt_intermediate_size"], v["patch_size"], v["text_hidden_size"]
    Dm = Dv * v["merge_kernel_size"][0] * v["merge_kernel_size"][1]

    def r(*shape, std=W_STD, base=0.0):
        return (base + std * torch.randn(shape, generator=g)).to(torch.bfloat16)

    t = {
        "vision_tower.patch_embed.proj.weight": r(Dv, 3, P, P),
        "vision_tower.patch_embed.proj.bias": r(Dv),
        "vision_tower.patch_embed.pos_emb.weight": r(v["init_pos_emb_height"], v["init_pos_emb_width"], Dv),
        "vision_tower.encoder.final_layernorm.weight": r(Dv, std=NORM_STD, base=1.0),
        "vision_tower.encoder.final_layernorm.bias": r(Dv),
        "mm_projector.pre_norm.weight": r(Dv, std=NORM_STD, base=1.0),
        "mm_projector.pre_norm.bias": r(Dv),
        "mm_projector.proj.0.weight": r(Dm, Dm),
        "mm_projector.proj.0.bias": r(Dm),
        "mm_projector.proj.2.weight": r(Dt, Dm),
        "mm_projector.proj.2.bias": r(Dt),
    }
    for j in range(v["vt_num_hidden_layers"]):
        b = f"vision_tower.encoder.blocks.{j}"
        t.update({
            f"{b}.norm0.weight": r(Dv, std=NORM_STD, base=1.0), f"{b}.norm0.bias": r(Dv),
            f"{b}.norm1.weight": r(Dv, std=NORM_STD, base=1.0), f"{b}.norm1.bias": r(Dv),
            f"{b}.wqkv.weight": r(3 * Dv, Dv), f"{b}.wqkv.bias": r(3 * Dv),
            f"{b}.wo.weight": r(Dv, Dv), f"{b}.wo.bias": r(Dv),
            f"{b}.mlp.fc0.weight": r(Iv, Dv), f"{b}.mlp.fc0.bias": r(Iv),
            f"{b}.mlp.fc1.weight": r(Dv, Iv), f"{b}.mlp.fc1.bias": r(Dv),
        })
    return t


def mla_notes(cfg, extra=""):
    q = ("q_lora_rank=%d: q = q_b_proj(q_a_layernorm(q_a_proj(x)))" % cfg.q_lora_rank if cfg.q_lora_rank is not None
         else "q_lora_rank=null: q = q_proj(x)")
    rp = cfg.rope_parameters
    rope = ("YaRN " + json.dumps({k: rp[k] for k in sorted(rp) if k not in ("rope_theta",)}, sort_keys=True)
            if rp.get("rope_type", "default") != "default" else "default RoPE")
    return (
        f"MLA ({q}; kv_lora_rank={cfg.kv_lora_rank}, qk_nope_head_dim={cfg.qk_nope_head_dim}, qk_rope_head_dim="
        f"{cfg.qk_rope_head_dim}, v_head_dim={cfg.v_head_dim}, rope_interleave={cfg.rope_interleave}, {rope}, "
        f"rope_theta={rp['rope_theta']}). The `mla` block holds inv_freq, the cos/sin attention_scaling and the "
        "softmax scale as the HF modules computed them; q_a_layernorm/kv_a_layernorm use eps 1e-6 in HF whatever "
        f"rms_norm_eps is. Router: sigmoid noaux_tc, n_group={cfg.n_group}, topk_group={cfg.topk_group}, "
        f"routing_weights include routed_scaling_factor={cfg.routed_scaling_factor}. " + extra
    )


GREEDY_MIN_DISTINCT = 3  # MLA fixtures: a greedy continuation of one repeated token tests little of the KV cache


def mla_ok(ref) -> bool:
    return margins_ok(ref) and len(set(ref["generated"])) >= GREEDY_MIN_DISTINCT


def try_mla(family, seed, staging: Path):
    produced = []
    if family == "deepseek_v3":
        # ---------------- deepseek_v3-f32: hub config, sharded, yarn, q_lora set, MTP layer ----------------
        hub = DSV3_HUB
        tokens = family_tokens(seed, hub["vocab_size"])
        model = build_random_hf(hub, seed)
        cfg = model.config
        ref = run_reference(model, tokens, cfg, "sigmoid_noaux_tc")
        if not mla_ok(ref) or ref["bias_changed"] == 0:
            print(f"[{family}] seed {seed}: f32 margins {ref['min_routing_margin']}, {ref['min_gen_routing_margin']}, "
                  f"{ref['min_greedy_margin']}, bias_changed {ref['bias_changed']}; reseeding")
            return False, []
        name = "deepseek_v3-f32"
        d = staging / name
        extra = mla_mtp_tensors(cfg, seed)
        sd = dict(model.state_dict())
        sd.update(extra)
        model.save_pretrained(str(d), state_dict=sd, max_shard_size="1MB")
        assert (d / "model.safetensors.index.json").exists() and len(list(d.glob("model-*.safetensors"))) >= 2
        write_json(d / "config.json", hub)
        (d / "generation_config.json").unlink(missing_ok=True)
        diff = verify_reload(d, tokens, ref["logits"], tol=1e-5)
        notes = common_notes(cfg) + " " + mla_notes(cfg, (
            "Config in hub (original DeepSeek-V3) spelling: top-level rope_theta + rope_scaling {type: yarn, factor "
            "40, original_max_position_embeddings 4096, beta_fast 32, beta_slow 1, mscale 1, mscale_all_dim 1}, no "
            "rope_interleave key (HF default true = interleaved pairs, as the real model). Saved sharded by HF "
            "save_pretrained(max_shard_size='1MB') in hub per-expert keys. Extra MTP-style tensors under "
            f"model.layers.{cfg.num_hidden_layers}.* (== num_hidden_layers; eh_proj, enorm, hnorm, shared_head.norm, "
            "kv_a_proj_with_mqa, gate, expert 0...) are in the checkpoint and MUST be ignored. The nonzero "
            f"e_score_correction_bias changes {ref['bias_changed']} (token, layer) expert sets vs zero bias. "
            f"HF reload max |logit diff| = {diff:.3g}."))
        write_reference(d, family, "float32", tokens, ref, notes,
                        extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "hf", "mla": mla_info(model),
                               "ignored_tensors_prefix": f"model.layers.{cfg.num_hidden_layers}."})
        produced.append((name, {"ref": ref}))

        # ---------------- deepseek_v3-mlx4: mlx_lm 4-bit of the same model ----------------
        name4 = "deepseek_v3-mlx4"
        d4 = staging / name4
        src = staging / "_hf_nomtp"  # mlx-lm's deepseek_v3 sanitize only drops model.layers.61.* (hard-coded)
        model.save_pretrained(str(src))
        write_json(src / "config.json", hub)
        qcfg = mlx_convert_4bit(src, d4)
        shutil.rmtree(src)
        hf_tmp = staging / "_hf_dequant"
        info = mlx_to_hf_f32(d4, qcfg, hub, hf_tmp)
        ref_model4 = load_hf(hf_tmp, dtype=torch.float32)
        ref4 = run_reference(ref_model4, tokens, ref_model4.config, "sigmoid_noaux_tc")
        shutil.rmtree(hf_tmp)
        if not mla_ok(ref4):
            print(f"[{family}] seed {seed}: mlx4 margins too small; reseeding")
            return False, []
        ml = mlx_logits(d4, tokens)
        mlx_diff = float(np.abs(ml - ref4["logits"].numpy()).max())
        ml32 = mlx_logits(d4, tokens, f32=True)
        mlx32_diff = float(np.abs(ml32 - ref4["logits"].numpy()).max())
        assert mlx32_diff < 1e-3, f"mlx-lm f32 forward disagrees with the dequantized HF reference: {mlx32_diff}"
        argmax_agree = int((ml.argmax(-1) == ref4["logits"].numpy().argmax(-1)).sum())
        notes4 = common_notes(cfg) + " " + mla_notes(cfg, (
            "Converted with mlx-lm's own code (equivalent to mlx_lm.convert --dtype bfloat16 -q --q-group-size 64 "
            "--q-bits 4) from the f32 fixture without its MTP tensors (mlx-lm's deepseek_v3 sanitize only drops "
            "model.layers.61.*). mlx-lm's sanitize replaced kv_b_proj [H*(dn+dv), C] by per-head "
            "self_attn.embed_q [H, C, dn] (= key rows transposed) and self_attn.unembed_out [H, dv, C] (= value "
            "rows), both quantized along their last axis; there is NO kv_b_proj key. Experts stacked in "
            "mlp.switch_mlp.*; router mlp.gate.weight not quantized (bf16), e_score_correction_bias f32. "
            "Reference: HF float32 model whose weights are the numpy float32 dequantized values scales*q+biases "
            "(kv_b_proj rebuilt per head as cat(embed_q[h]^T, unembed_out[h])), unquantized tensors upcast. "
            f"mlx-lm's own forward with all float params upcast to f32 matches the reference to {mlx32_diff:.3g} "
            f"(asserted < 1e-3); its native bf16 forward differs by max |logit diff| {mlx_diff:.3g} (argmax agrees "
            f"on {argmax_agree}/{T} positions), informational only."))
        write_reference(d4, family, "mlx-affine-4bit-g64", tokens, ref4, notes4,
                        extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "mlx",
                               "mla": mla_info(ref_model4), "quantization": info,
                               "mlx_lm_logits_max_abs_diff": mlx_diff, "mlx_lm_f32_logits_max_abs_diff": mlx32_diff,
                               "mlx_lm_argmax_agree": argmax_agree})
        produced.append((name4, {"ref": ref4, "quant": info}))

        # ---------------- deepseek_v3-qproj-bf16: q_proj, NEOX rope, default rope, t5 spelling ----------------
        hubq = DSV3_QPROJ_HUB
        seedq = seed + 100
        mq = build_random_hf(hubq, seedq)
        refq32 = run_reference(mq, tokens, mq.config, "sigmoid_noaux_tc")
        if not mla_ok(refq32):
            print(f"[{family}] seed {seed}: qproj f32 margins too small; reseeding")
            return False, []
        nameq = "deepseek_v3-qproj-bf16"
        dq = staging / nameq
        with tempfile.TemporaryDirectory() as td:
            mq.save_pretrained(td)
            write_json(Path(td) / "config.json", hubq)
            m16 = AutoModelForCausalLM.from_pretrained(td, dtype=torch.bfloat16)
            m16.save_pretrained(str(dq))  # transformers-5 config spelling, router kept f32 (mixed dtypes)
        del m16
        (dq / "generation_config.json").unlink(missing_ok=True)
        mq16 = load_hf(dq, dtype=torch.float32)
        refq = run_reference(mq16, tokens, mq16.config, "sigmoid_noaux_tc")
        if not mla_ok(refq):
            print(f"[{family}] seed {seed}: qproj bf16 margins too small; reseeding")
            return False, []
        t5 = json.load(open(dq / "config.json"))
        assert t5["head_dim"] == hubq["qk_rope_head_dim"] and "rope_parameters" in t5, t5
        dts = {}
        with safe_open(str(dq / "model.safetensors"), "pt") as f:
            for k in f.keys():
                dts.setdefault(f.get_slice(k).get_dtype(), []).append(k)
        notesq = common_notes(mq.config) + " " + mla_notes(mq.config, (
            "The OTHER MLA branches: q_lora_rank null (plain self_attn.q_proj, as DeepSeek-V2-Lite), rope_interleave "
            "false (NEOX rotate_half pairs (j, j+dr/2)), default RoPE (no yarn, softmax scale qk_head_dim^-0.5), "
            "4 groups of 2 experts with 2 kept. Written by HF from_pretrained(dtype=bfloat16).save_pretrained(): "
            "transformers-5 config spelling: rope_parameters {rope_theta, rope_type}, dtype, and the derived "
            f"\"head_dim\": {t5['head_dim']} (== qk_rope_head_dim, NOT the attention head size) and \"qk_head_dim\": "
            f"{t5.get('qk_head_dim')}. HF keeps mlp.gate.weight and e_score_correction_bias in F32 "
            "(_keep_in_fp32_modules_strict): mixed-dtype checkpoint. Reference: the bf16 weights upcast to f32."))
        write_reference(dq, family, "bfloat16", tokens, refq, notesq,
                        extra={"seed": seedq, "moe_layers": moe_layers(mq.config), "layout": "hf",
                               "mla": mla_info(mq16), "tensor_dtype_counts": {k: len(v) for k, v in dts.items()},
                               "f32_tensors": sorted(dts.get("F32", []))})
        produced.append((nameq, {"ref": refq}))
        return True, produced

    if family == "glm4_moe_lite":
        hub = GLM_LITE_HUB
        tokens = family_tokens(seed, hub["vocab_size"])
        model = build_random_hf(hub, seed)
        cfg = model.config
        assert moe_layers(cfg) == [i for i in range(cfg.num_hidden_layers) if i >= hub["first_k_dense_replace"]]
        name = "glm4_moe_lite-bf16"
        d = staging / name
        d.mkdir(parents=True)
        sd = to_bf16_hub(hub_state_dict(model))
        sd.update(to_bf16_hub(mla_mtp_tensors(cfg, seed)))
        save_file(dict(sorted(sd.items())), str(d / "model.safetensors"), metadata={"format": "pt"})
        write_json(d / "config.json", hub)
        ref_model = load_hf(d, dtype=torch.float32)  # bf16 weights upcast
        ref = run_reference(ref_model, tokens, ref_model.config, "sigmoid_noaux_tc")
        if not mla_ok(ref) or ref["bias_changed"] == 0:
            print(f"[{family}] seed {seed}: margins {ref['min_routing_margin']}, {ref['min_gen_routing_margin']}, "
                  f"{ref['min_greedy_margin']}, bias_changed {ref['bias_changed']}; reseeding")
            return False, []
        notes = common_notes(cfg) + " " + mla_notes(cfg, (
            "GLM-4.7-Flash layout: config in the hub spelling of the real one (top-level rope_theta 1e6, "
            "rope_scaling null, partial_rotary_factor 1.0, first_k_dense_replace 1, num_nextn_predict_layers 1, "
            "dtype bfloat16, no mlp_layer_types and no rope_interleave key -> HF defaults: mlp_layer_types = "
            "['dense'] + ['sparse']*(n-1), interleaved RoPE). HF glm4_moe_lite decides dense/MoE ONLY from "
            "mlp_layer_types (it ignores first_k_dense_replace); mlx-lm uses first_k_dense_replace; they agree "
            "here. Single model.safetensors, hub per-expert keys, every tensor BF16 except "
            "mlp.gate.e_score_correction_bias (F32); router mlp.gate.weight is BF16. MTP-style tensors under "
            f"model.layers.{cfg.num_hidden_layers}.* MUST be ignored. rms_norm_eps 1e-5 but HF's q_a_layernorm/"
            "kv_a_layernorm use 1e-6 (mlx-lm's glm4_moe_lite uses rms_norm_eps there: an HF/mlx-lm difference). "
            f"The nonzero e_score_correction_bias changes {ref['bias_changed']} (token, layer) expert sets. "
            "Reference: the bf16 weights upcast to float32."))
        write_reference(d, family, "bfloat16", tokens, ref, notes,
                        extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "hf", "mla": mla_info(ref_model),
                               "ignored_tensors_prefix": f"model.layers.{cfg.num_hidden_layers}.",
                               "f32_tensors": sorted(k for k, v in sd.items() if v.dtype == torch.float32)})
        produced.append((name, {"ref": ref}))
        return True, produced

    if family == "kimi_k25":
        text = KIMI_TEXT_HUB
        plain = {**text, "model_type": "deepseek_v3"}  # transformers maps kimi_k2 -> deepseek_v3 the same way
        tokens = family_tokens(seed, text["vocab_size"])
        model = build_random_hf(plain, seed)
        cfg = model.config
        sd = to_bf16_hub(hub_state_dict(model))
        # reference: HF DeepseekV3ForCausalLM on the UNprefixed bf16 weights (upcast to f32)
        hf_tmp = staging / "_hf_unprefixed"
        hf_tmp.mkdir()
        save_file(sd, str(hf_tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(hf_tmp / "config.json", plain)
        ref_model = load_hf(hf_tmp, dtype=torch.float32)
        ref = run_reference(ref_model, tokens, ref_model.config, "sigmoid_noaux_tc")
        shutil.rmtree(hf_tmp)
        if not mla_ok(ref):
            print(f"[{family}] seed {seed}: margins {ref['min_routing_margin']}, {ref['min_gen_routing_margin']}, "
                  f"{ref['min_greedy_margin']}; reseeding")
            return False, []
        name = "kimi_k25-bf16"
        d = staging / name
        d.mkdir(parents=True)
        pref = {"language_model." + k: v for k, v in sd.items()}
        vis = kimi_vision_tensors(seed)
        allt = {**pref, **vis}
        first = sorted(k for k in pref if k.startswith("language_model.model.embed_tokens.")
                       or k.startswith("language_model.model.layers.0.") or k.startswith("language_model.model.layers.1."))
        rest = sorted(k for k in allt if k not in set(first))
        save_sharded(allt, d, [first, rest])
        write_json(d / "config.json", KIMI_WRAPPER)
        # cross-check: transformers' own kimi_k25 model (text path) on the prefixed checkpoint
        kimi_diff = kimi_hf_crosscheck(d, tokens, ref["logits"])
        notes = common_notes(cfg) + " " + mla_notes(cfg, (
            "Kimi-K2.5 layout: wrapper config {model_type kimi_k25, architectures [KimiK25ForConditionalGeneration], "
            "tie_word_embeddings false, text_config {model_type kimi_k2, DeepSeek-V3 fields}, vision_config {vt_*}}; "
            "text_config mirrors the real one scaled down (n_group 1, topk_group 1, routed_scaling_factor 2.827, "
            "rope_theta 50000, yarn factor 64 with beta_fast = beta_slow = 1, rms_norm_eps 1e-5, no MTP). "
            "Every text tensor carries the prefix `language_model.`: language_model.model.embed_tokens.weight, "
            "language_model.model.layers.{i}..., language_model.model.norm.weight, language_model.lm_head.weight; "
            "plus vision tensors (vision_tower.patch_embed.*, vision_tower.encoder.blocks.0.*, "
            "vision_tower.encoder.final_layernorm.*) and projector tensors (mm_projector.pre_norm.*, "
            "mm_projector.proj.0.*, mm_projector.proj.2.*) that MUST be ignored. Two shards + "
            "model.safetensors.index.json (vision/projector in the second). BF16 except e_score_correction_bias "
            "(F32). Reference: HF DeepseekV3ForCausalLM (model_type deepseek_v3) on the UNprefixed bf16 weights "
            f"upcast to f32. Cross-check: transformers' Kimi_K25ForConditionalGeneration loading this directory's "
            f"tensors (text path) reproduces the reference logits to {kimi_diff:.3g}."))
        write_reference(d, family, "bfloat16", tokens, ref, notes,
                        extra={"seed": seed, "moe_layers": moe_layers(cfg), "layout": "hf",
                               "key_prefix": "language_model.", "mla": mla_info(ref_model),
                               "ignored_tensors": sorted(vis), "kimi_k25_hf_crosscheck_max_abs_diff": kimi_diff})
        produced.append((name, {"ref": ref}))
        return True, produced
    raise ValueError(family)


def kimi_hf_crosscheck(d: Path, tokens, expect) -> float:
    """Load the prefixed checkpoint with transformers' Kimi_K25ForConditionalGeneration (vision config given in
    transformers' own field names so that the model builds) and compare its text-only logits."""
    from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    v = KIMI_VISION
    with tempfile.TemporaryDirectory() as td:
        for f in d.glob("model*"):
            os.symlink(f.resolve(), Path(td) / f.name)
        cfg = Kimi_K25Config(
            text_config=copy.deepcopy(KIMI_TEXT_HUB),  # HF mutates nested rope dicts in place
            vision_config={"hidden_size": v["vt_hidden_size"], "intermediate_size": v["vt_intermediate_size"],
                           "num_attention_heads": v["vt_num_attention_heads"],
                           "num_hidden_layers": v["vt_num_hidden_layers"], "patch_size": v["patch_size"],
                           "pos_emb_height": v["init_pos_emb_height"], "pos_emb_width": v["init_pos_emb_width"],
                           "pos_emb_time": v["init_pos_emb_time"], "merge_kernel_size": v["merge_kernel_size"]},
            projection_hidden_size=v["mm_hidden_size"],
            tie_word_embeddings=False,
        )
        cfg.save_pretrained(td)
        m = Kimi_K25ForConditionalGeneration.from_pretrained(
            td, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager")
        m.eval()
        with torch.no_grad():
            lg = m(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].float()
    diff = float((lg - expect).abs().max())
    assert diff <= 1e-5, f"transformers kimi_k25 disagrees with the deepseek_v3 reference: {diff}"
    return diff


def make_mla(family: str, out_root: Path, summary: list):
    for attempt in range(40):
        seed = MLA_FAMILIES[family] + attempt
        staging = Path(tempfile.mkdtemp(prefix=f"fx_{family}_"))
        try:
            ok, produced = try_mla(family, seed, staging)
        except AssertionError as e:
            print(f"[{family}] seed {seed}: assertion {e}; reseeding")
            ok, produced = False, []
        if ok:
            for name, meta in produced:
                dst = out_root / name
                if dst.exists():
                    shutil.rmtree(dst)
                shutil.copytree(staging / name, dst)
                for f in dst.iterdir():
                    f.chmod(0o644)
                summary.append((name, dir_size(dst), meta))
            shutil.rmtree(staging)
            print(f"[{family}] done with seed {seed}")
            return
        shutil.rmtree(staging)
    raise SystemExit(f"{family}: no seed passed the margin checks")


# ----------------------------------------------------------------------------------------------------------------
# references for the shipped trained model (models/glm4-moe-tiny): no weights copied, reference.* only
# ----------------------------------------------------------------------------------------------------------------

def make_mistral3(out_root: Path, summary: list):
    """Mistral Large 3's layout: a `mistral3` wrapper (Mistral3ForConditionalGeneration, pixtral vision tower)
    whose `text_config` is a DeepSeek-V3 model. Built by HF from the deepseek_v3-f32 fixture's own weights (text
    model and lm_head copied, a tiny random vision tower), saved by HF save_pretrained; the wrapper's text-only
    forward must give the deepseek_v3-f32 reference logits, which this fixture then reuses."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    src = out_root / "deepseek_v3-f32"
    ds = load_hf(src, dtype=torch.float32)
    ref = json.load(open(src / "reference.json"))
    text = json.load(open(src / "config.json"))
    vision = {"model_type": "pixtral", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "head_dim": 16, "image_size": 64, "patch_size": 16}
    # An image-token id the reference never uses (HF replaces image tokens by vision features).
    used = set(ref["tokens"]) | set(ref["greedy"]["prompt"]) | set(ref["greedy"]["generated"])
    image_token = max(i for i in range(ds.config.vocab_size) if i not in used)
    cfg = Mistral3Config(text_config=text, vision_config=vision, image_token_index=image_token,
                         tie_word_embeddings=False)
    torch.manual_seed(9000)
    m = Mistral3ForConditionalGeneration._from_config(
        cfg, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    m.model.language_model.load_state_dict(ds.model.state_dict())
    m.lm_head.load_state_dict(ds.lm_head.state_dict())
    tokens = ref["tokens"]
    with torch.no_grad():
        want = ds(input_ids=torch.tensor([tokens])).logits[0]
        got = m(input_ids=torch.tensor([tokens])).logits[0]
    diff = float((want - got).abs().max())
    assert diff == 0.0, f"the wrapper's text forward differs from the text model's: {diff}"
    dst = out_root / "mistral3_deepseek_v3-f32"
    if dst.exists():
        shutil.rmtree(dst)
    m.save_pretrained(str(dst))
    (dst / "generation_config.json").unlink(missing_ok=True)
    for f in ("reference.safetensors",):
        shutil.copy(src / f, dst / f)
    ref["family"] = "mistral3"
    ref["notes"] = (
        "Mistral Large 3's layout: model_type mistral3 (Mistral3ForConditionalGeneration) wrapping a deepseek_v3 "
        "text_config, keys under language_model.model.* plus a pixtral vision tower and projector that the engine "
        "never reads. Made by HF from the deepseek_v3-f32 fixture (text model and lm_head weights copied; vision "
        "random) and saved by HF save_pretrained; the wrapper's text-only forward equals the text model's exactly "
        "(asserted), so this reference is deepseek_v3-f32's. " + ref["notes"]
    )
    write_json(dst / "reference.json", ref)
    for f in dst.iterdir():
        f.chmod(0o644)
    print(f"[mistral3] mistral3_deepseek_v3-f32: {dir_size(dst) / 1024:.1f} KiB, wrapper == text model (max |diff| {diff})")


SHIPPED_DIR = "models/glm4-moe-tiny"
SHIPPED_T = 16  # reference sequence length (real text), greedy continues from all of it
SHIPPED_PROMPTS = [
    "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__, self.name)\n",
    "import os\nimport sys\n\n\ndef main(argv=None):\n    if argv is None:\n        argv = sys.argv[1:]\n",
    "class Queue:\n    def __init__(self, maxsize=0):\n        self.maxsize = maxsize\n        self.queue = []\n",
    "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(description=__doc__)\n",
]


def shipped_tokens(tok, text):
    ids = tok.encode(text).ids
    assert len(ids) >= SHIPPED_T, f"prompt too short ({len(ids)} tokens): {text!r}"
    return [int(x) for x in ids[:SHIPPED_T]]


def shipped_notes(kind, cfg, text, extra=""):
    return (
        f"Reference for the shipped trained model ({kind}); weights are NOT copied here, see model_dir. Tokens: "
        f"the first {SHIPPED_T} tokens of a Python snippet (prompt_text, decoded back from the tokens) encoded with "
        "the model's own tokenizer.json. Reference computed with HF transformers in float32, attn_implementation="
        "eager, experts_implementation=eager. routing[layer][t] = expert ids chosen for token t (sorted ascending), "
        "captured by a forward hook on the HF router module (mlp.gate); routing_weights are the HF router's weights "
        f"for those ids (same order), incl. routed_scaling_factor={cfg.routed_scaling_factor}. MoE layers: "
        f"{moe_layers(cfg)}. Greedy: HF generate(do_sample=False) with KV cache from ALL {SHIPPED_T} tokens "
        f"(greedy.prompt == tokens), {GEN_LEN} new tokens, cross-checked with a no-cache argmax loop. " + extra
    )


def make_shipped(out_root: Path, summary: list):
    from tokenizers import Tokenizer

    src = REPO / SHIPPED_DIR
    src4 = src / "mlx-4bit"
    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    hub = json.load(open(src / "config.json"))
    qcfg = json.load(open(src4 / "config.json"))
    hub4 = {k: v for k, v in qcfg.items() if k not in ("quantization", "quantization_config")}
    router = "sigmoid_noaux_tc"

    m16 = load_hf(src, dtype=torch.float32)  # bf16 weights upcast to f32
    staging = Path(tempfile.mkdtemp(prefix="fx_shipped_"))
    hf_tmp = staging / "_hf_dequant"
    info = mlx_to_hf_f32(src4, qcfg, hub4, hf_tmp)
    m4 = load_hf(hf_tmp, dtype=torch.float32)
    try:
        for text in SHIPPED_PROMPTS:
            tokens = shipped_tokens(tok, text)
            ptext = tok.decode(tokens, skip_special_tokens=False)
            ref16 = run_reference(m16, tokens, m16.config, router, prompt_len=SHIPPED_T)
            ref4 = run_reference(m4, tokens, m4.config, router, prompt_len=SHIPPED_T)
            if not (margins_ok(ref16) and margins_ok(ref4)):
                print(f"[shipped] prompt {text!r}: margins too small "
                      f"bf16 {ref16['min_routing_margin']}, {ref16['min_gen_routing_margin']}, {ref16['min_greedy_margin']}; "
                      f"mlx4 {ref4['min_routing_margin']}, {ref4['min_gen_routing_margin']}, {ref4['min_greedy_margin']}")
                continue
            break
        else:
            raise SystemExit("shipped: no prompt passed the margin checks")
        # HF masks dropped groups with -inf, mlx-lm with 0.0: they agree when every s + bias > 0, i.e. bias >= 0 here
        for m in (m16, m4):
            for n, b in m.named_buffers():
                if n.endswith("e_score_correction_bias"):
                    assert float(b.min()) >= 0.0, f"{n} has negative entries: mlx/HF group masking may differ"
        ml = mlx_logits(src4, tokens)
        ml32 = mlx_logits(src4, tokens, f32=True)
        mlx_diff = float(np.abs(ml - ref4["logits"].numpy()).max())
        mlx32_diff = float(np.abs(ml32 - ref4["logits"].numpy()).max())
        assert mlx32_diff < 1e-3, f"mlx-lm f32 forward disagrees with the dequantized HF reference: {mlx32_diff}"
        argmax_agree = int((ml.argmax(-1) == ref4["logits"].numpy().argmax(-1)).sum())
        gen_text16 = tok.decode(ref16["generated"], skip_special_tokens=False)
        gen_text4 = tok.decode(ref4["generated"], skip_special_tokens=False)
        common = {"model_dir": SHIPPED_DIR, "prompt_text": ptext, "moe_layers": moe_layers(m16.config)}

        d16 = out_root / "glm4-moe-tiny-bf16"
        d16.mkdir(parents=True, exist_ok=True)
        write_reference(
            d16, "glm4_moe", "bfloat16", tokens, ref16,
            shipped_notes("HF bf16, sharded, hub per-expert keys", m16.config, ptext,
                          "Reference: the bf16 weights loaded by HF and upcast to float32 (gate.weight too)."),
            extra={**common, "layout": "hf", "generated_text": gen_text16}, prompt_len=SHIPPED_T)
        d4 = out_root / "glm4-moe-tiny-mlx4"
        d4.mkdir(parents=True, exist_ok=True)
        write_reference(
            d4, "glm4_moe", "mlx-affine-4bit-g64", tokens, ref4,
            shipped_notes(
                "mlx_lm 4-bit conversion, stacked switch_mlp", m4.config, ptext,
                "Reference: HF float32 model whose weights are the numpy float32 dequantized values scales*q+biases "
                "(cross-checked vs mx.dequantize); unquantized tensors (norms, bf16 router weight, f32 "
                "e_score_correction_bias, attention biases) = stored values upcast. mlx-lm's own forward with all "
                f"float params upcast to f32 matches the reference to {mlx32_diff:.3g} (asserted < 1e-3); its native "
                f"bf16 forward differs by max |logit diff| {mlx_diff:.3g} (argmax agrees on {argmax_agree}/"
                f"{SHIPPED_T} positions), informational only."),
            extra={**{**common, "model_dir": SHIPPED_DIR + "/mlx-4bit"}, "layout": "mlx",
                   "generated_text": gen_text4, "quantization": info, "mlx_lm_logits_max_abs_diff": mlx_diff,
                   "mlx_lm_f32_logits_max_abs_diff": mlx32_diff, "mlx_lm_argmax_agree": argmax_agree},
            prompt_len=SHIPPED_T)
        for d in (d16, d4):
            for f in d.iterdir():
                f.chmod(0o644)
        summary.append(("shipped/glm4-moe-tiny-bf16", dir_size(d16), {"ref": ref16}))
        summary.append(("shipped/glm4-moe-tiny-mlx4", dir_size(d4), {"ref": ref4}))
        print(f"[shipped] prompt {ptext!r}\n  bf16 -> {gen_text16!r}\n  mlx4 -> {gen_text4!r}")
    finally:
        shutil.rmtree(staging)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "tests" / "fixtures" / "models"))
    ap.add_argument("--only", default="glm4_moe,qwen3_moe,mixtral,llama,qwen3_next,kimi_linear,deepseek_v3,glm4_moe_lite,kimi_k25,mistral3")
    ap.add_argument("--shipped", action="store_true",
                    help=f"only write references for the shipped trained model {SHIPPED_DIR} (HF bf16 + mlx-4bit) "
                         "under tests/fixtures/shipped/ (or --out), without copying weights")
    args = ap.parse_args()
    summary = []
    if args.shipped:
        out_root = Path(args.out) if args.out != ap.get_default("out") else REPO / "tests" / "fixtures" / "shipped"
        out_root.mkdir(parents=True, exist_ok=True)
        make_shipped(out_root, summary)
    else:
        out_root = Path(args.out)
        out_root.mkdir(parents=True, exist_ok=True)
        for fam in args.only.split(","):
            fam = fam.strip()
            if fam in MLA_FAMILIES:
                make_mla(fam, out_root, summary)
            elif fam == "mistral3":
                make_mistral3(out_root, summary)
            else:
                make_family(fam, out_root, summary)
    print("\n=== summary ===")
    print("versions:", json.dumps(VERSIONS))
    total = 0
    for name, size, meta in summary:
        ref = meta["ref"]
        total += size
        print(
            f"{name:24s} {size/1024:8.1f} KiB  routing layers={list(ref['routing'].keys())} "
            f"min_margin={ref['min_routing_margin']} greedy={ref['generated']} "
            f"greedy_margin={ref['min_greedy_margin']:.4g}"
        )
    print(f"total {total/1024/1024:.2f} MiB in {out_root}")


if __name__ == "__main__":
    main()
