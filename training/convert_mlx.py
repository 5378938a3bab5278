#!/usr/bin/env python3
"""Make an MLX quantized copy of glm4-moe-tiny with mlx-lm's own converter, then check it.

    python3 training/convert_mlx.py models/glm4-moe-tiny models/glm4-moe-tiny/mlx-4bit
    python3 training/convert_mlx.py models/glm4-moe-tiny models/glm4-moe-tiny/mlx-2bit 2

The 4-bit copy is the default experiment's model; the 2-bit copy is the lower-precision checkpoint
that `low-bit` misses read (experiments/literature.toml).

`mlx_lm.convert` stacks the per-expert HF tensors into `mlp.switch_mlp.{gate,up,down}_proj` and
quantizes every Linear/Embedding (affine, group 64, 4 bits, bf16 scales/biases); the router weight
(`mlp.gate.weight`, a plain array) stays bf16 and `e_score_correction_bias` stays float32
(glm4_moe's `cast_predicate`). The check compares the 4-bit model's next-token predictions with the
bf16 HF checkpoint run by transformers on a few held-out files and prints greedy generations.
"""
import json
import math
import os
import shutil
import sys

import numpy as np


def main(hf_dir: str, mlx_dir: str, bits: int = 4) -> None:
    import mlx.core as mx
    from mlx_lm import convert, generate, load

    if os.path.exists(mlx_dir):
        shutil.rmtree(mlx_dir)
    convert(hf_dir, mlx_dir, quantize=True, q_group_size=64, q_bits=bits)
    readme = os.path.join(mlx_dir, "README.md")
    if os.path.exists(readme):  # mlx-lm writes a hub stub card; the real card is ../README.md
        os.remove(readme)

    model, tok = load(mlx_dir)
    prompts = [
        "import os\nimport sys\n\n\ndef ",
        "class Queue:\n    \"\"\"",
        "The following functions are provided by this module:",
    ]
    for p in prompts:
        out = generate(model, tok, prompt=p, max_tokens=60, verbose=False)
        print(f"--- {p!r}\n{p}{out}\n")

    # logits against transformers (bf16 checkpoint, f32 compute) on held-out files
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    summary = json.load(open(os.path.join(hf_dir, "run_summary.json")))
    root = os.environ.get("CORPUS_DIR", "/root/.pyenv/versions/3.13.0/lib/python3.13")
    files = [f for f in summary["corpus"]["val_file_list"] if os.path.exists(os.path.join(root, f))][:6]
    agree = tot = 0
    nll_hf = nll_mlx = 0.0
    for f in files:
        ids = tok.encode(open(os.path.join(root, f), encoding="utf-8").read())[:512]
        x = ids[:-1]
        with torch.no_grad():
            lh = hf(torch.tensor([x])).logits[0].float().numpy()
        lm = np.array(model(mx.array([x]))[0].astype(mx.float32))
        y = np.array(ids[1:])
        agree += int((lh.argmax(-1) == lm.argmax(-1)).sum())
        tot += len(y)
        for l, acc in ((lh, "hf"), (lm, "mlx")):
            l = l - l.max(-1, keepdims=True)
            nll = -(l[np.arange(len(y)), y] - np.log(np.exp(l).sum(-1))).sum()
            if acc == "hf":
                nll_hf += nll
            else:
                nll_mlx += nll
    print(f"{len(files)} held-out files, {tot} tokens: top-1 agreement MLX-{bits}bit vs HF-bf16 "
          f"{agree/tot:.3f}; loss HF {nll_hf/tot:.4f} (ppl {math.exp(nll_hf/tot):.2f}), "
          f"MLX {bits}-bit {nll_mlx/tot:.4f} (ppl {math.exp(nll_mlx/tot):.2f})")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 4)
