#!/usr/bin/env python3
"""mlx-lm's own greedy decode of an MLX checkpoint (no tokenizer needed), timed.

Usage: python3 scripts/peers/mlx_decode.py MODEL_DIR PROMPT_IDS(comma-separated) NEW_TOKENS [REPEATS]
Float parameters are upcast to f32 first. Prints one JSON line: prefill and decode tok/s (medians over REPEATS runs; the first, warm-up run is
not counted), the greedy tokens, mlx's version and its default device.
"""
import json
import statistics
import sys
import time

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.generate import generate_step
from mlx_lm.utils import load_model

from pathlib import Path

model_dir, prompt, n = sys.argv[1], [int(t) for t in sys.argv[2].split(",")], int(sys.argv[3])
repeats = int(sys.argv[4]) if len(sys.argv) > 4 else 3
model, _ = load_model(Path(model_dir))
# Float parameters (quantization scales and biases, norms, the router) in f32: the engine it is compared
# with computes in f32, and MLX's CPU backend is slow in bf16 on CPUs without native bf16 arithmetic.
model.update(tree_map(lambda v: v.astype(mx.float32) if mx.issubdtype(v.dtype, mx.floating) else v,
                      model.parameters()))
runs = []
for r in range(repeats + 1):
    t0 = time.perf_counter()
    tokens, t1 = [], None
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        tokens.append(int(tok))
        if t1 is None:
            t1 = time.perf_counter()
    t2 = time.perf_counter()
    if r > 0:
        runs.append((len(prompt) / (t1 - t0), (n - 1) / (t2 - t1), tokens))
print(json.dumps({
    "peer": "mlx-lm",
    "mlx": mx.__version__,
    "device": str(mx.default_device()),
    "float_params": "f32",
    "prefill_tps": statistics.median(r[0] for r in runs),
    "decode_tps": statistics.median(r[1] for r in runs),
    "tokens": runs[-1][2],
}))
