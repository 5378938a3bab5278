"""HF transformers eager decode baseline (all experts resident) for a config.json, on the GPU:
random weights in bf16 (speed only), greedy decode of N tokens after a 16-token prompt.
Prints one JSON line: {"model_type", "layers", "decode_tps", "prefill_s", "device", "torch", "transformers"}.

Usage: python3 scripts/hf_decode_baseline.py CONFIG.json [--layers N] [--tokens 32]
"""
import argparse
import json
import time

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("config")
ap.add_argument("--layers", type=int)
ap.add_argument("--tokens", type=int, default=32)
a = ap.parse_args()
raw = json.load(open(a.config))
raw.pop("quantization", None)
raw.pop("quantization_config", None)
if a.layers:
    raw["num_hidden_layers"] = a.layers
cfg = AutoConfig.for_model(**raw)
torch.manual_seed(0)
with torch.device("cuda"):
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16, attn_implementation="eager")
model.eval()
ids = torch.randint(0, cfg.vocab_size, (1, 16), device="cuda")
with torch.no_grad():
    model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)  # warm-up
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = model(ids, use_cache=True)
    torch.cuda.synchronize()
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    model.generate(ids, max_new_tokens=a.tokens, min_new_tokens=a.tokens, do_sample=False)
    torch.cuda.synchronize()
    total = time.perf_counter() - t
print(json.dumps({
    "model_type": raw["model_type"], "layers": cfg.num_hidden_layers, "decode_tps": a.tokens / max(total - prefill, 1e-9),
    "prefill_s": prefill, "device": torch.cuda.get_device_name(0), "torch": torch.__version__, "transformers": transformers.__version__,
    "experts_implementation": getattr(cfg, "_experts_implementation", None),
}))
