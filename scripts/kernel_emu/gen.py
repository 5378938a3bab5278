"""Writes the CUDA sources the engine compiles with NVRTC as C++ headers for HIP-CPU.

Each header holds the shared scale and row-product source (`src/weights/cuda/mod.rs`) and one
module's kernels, read from the Rust source as the engine embeds them, with the two spellings
HIP-CPU needs changed (dynamic shared memory through `HIP_DYNAMIC_SHARED`, no `extern "C"`).
Usage: python3 gen.py OUTDIR (run by run.sh).
"""
import os
import re
import sys

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")


def sources(path):
    text = open(os.path.join(ROOT, path)).read()
    return {m.group(1): m.group(2) for m in re.finditer(r'const (\w+): &str = r#"(.*?)"#;', text, re.S)}


MODULES = {
    "matrix": ("src/weights/cuda/matrix.rs", ["SRC"]),
    "fused": ("src/experts/upload/fused.rs", ["FUSED_SRC"]),
    "mla": ("src/models/mla_cuda.rs", ["SRC"]),
    "argmax": ("src/models/argmax_cuda.rs", ["SRC"]),
    "fill": ("src/experts/upload/fused.rs", ["FILL_SRC"]),
}

base = sources("src/weights/cuda/mod.rs")
out = sys.argv[1]
for name, (path, keys) in MODULES.items():
    mod = sources(path)
    code = base["SCALE_SRC"] + base["ROW_DOT_SRC"] + "".join(mod[k] for k in keys)
    code = re.sub(r"extern __shared__ (\w+) (\w+)\[\];", r"HIP_DYNAMIC_SHARED(\1, \2)", code)
    code = code.replace('extern "C" __global__', "__global__")
    with open(os.path.join(out, f"k_{name}.h"), "w") as f:
        f.write('#include "prelude.h"\n' + code)
