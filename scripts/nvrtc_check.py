"""Compiles every CUDA source the engine builds with NVRTC at run time, as the engine composes
it, and checks that each kernel it looks up is in the result: a kernel change that does not
compile fails here, on a machine without a GPU (CI), instead of at a GPU user's first run.

Each `KernelSet` call in src/ names its source as `|| format!("{A}{B}…")` or
`|| NAME.to_string()` and its kernels as `&["k1", "k2", …]`; the constants are the file's own,
its sibling files' or the shared ones of src/weights/cuda/mod.rs. Every file with a `__global__`
kernel in a raw string must have such a call, or a sibling's call must use it. NVRTC comes from PyPI's nvidia-cuda-nvrtc wheel (the CUDA 13.0
release ../shared/tools/cuda-env.sh uses), downloaded into ~/.cache/moe-harness-nvrtc once.
Usage: python3 scripts/nvrtc_check.py     (exit status 0 when everything compiles)
"""
import ctypes
import glob
import os
import re
import subprocess
import sys
import zipfile

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
WHEEL = "nvidia-cuda-nvrtc==13.0.88"


def nvrtc():
    cache = os.path.expanduser("~/.cache/moe-harness-nvrtc")
    libs = glob.glob(os.path.join(cache, "**", "libnvrtc.so.13"), recursive=True)
    if not libs:
        os.makedirs(cache, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", cache, WHEEL], check=True)
        for whl in glob.glob(os.path.join(cache, "*.whl")):
            zipfile.ZipFile(whl).extractall(cache)
        libs = glob.glob(os.path.join(cache, "**", "libnvrtc.so.13"), recursive=True)
    if not libs:
        sys.exit(f"nvrtc_check: no libnvrtc.so.13 in {cache} after installing {WHEEL}")
    for dep in glob.glob(os.path.join(os.path.dirname(libs[0]), "libnvrtc-builtins.so*")):
        ctypes.CDLL(dep, mode=ctypes.RTLD_GLOBAL)
    return ctypes.CDLL(libs[0])


def consts(text):
    return {m.group(1): m.group(2) for m in re.finditer(r'const (\w+): &str = r#"(.*?)"#;', text, re.S)}


def compile_ptx(lib, src, name):
    prog = ctypes.c_void_p()
    lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None)
    rc = lib.nvrtcCompileProgram(prog, 0, None)
    n = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(n))
    log = ctypes.create_string_buffer(n.value)
    lib.nvrtcGetProgramLog(prog, log)
    ptx = ""
    if rc == 0:
        lib.nvrtcGetPTXSize(prog, ctypes.byref(n))
        buf = ctypes.create_string_buffer(n.value)
        lib.nvrtcGetPTX(prog, buf)
        ptx = buf.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(), ptx


CALL = r'\|\|\s*(?:format!\("((?:\{\w+\})+)"\)|(\w+)\.to_string\(\))\s*,\s*&\[(.*?)\]'


def main():
    shared = consts(open(os.path.join(ROOT, "src/weights/cuda/mod.rs")).read())
    lib = nvrtc()
    failures, modules = 0, 0
    texts = {p: open(p).read()
             for p in sorted(glob.glob(os.path.join(ROOT, "src", "**", "*.rs"), recursive=True))}
    for path, text in texts.items():
        mine = consts(text)
        rel = os.path.relpath(path, ROOT)
        calls = list(re.finditer(CALL, text, re.S))
        # Constants of the module's sibling files too (a kernel source kept in a file of its own).
        siblings = [p for p in texts if p != path and os.path.dirname(p) == os.path.dirname(path)]
        own = {}
        for sib in siblings:
            own.update(consts(texts[sib]))
        own.update(mine)
        if not calls:
            used = {n for sib in siblings for c in re.finditer(CALL, texts[sib], re.S)
                    for n in re.findall(r"\{(\w+)\}", c.group(1) or "")}
            if any("__global__" in v and k not in used for k, v in mine.items()):
                print(f"FAIL {rel}: CUDA kernels in a raw string but no KernelSet call this check can read")
                failures += 1
            continue
        for c in calls:
            parts = re.findall(r"\{(\w+)\}", c.group(1)) if c.group(1) else [c.group(2)]
            missing = [p for p in parts if p not in own and p not in shared]
            if missing:
                print(f"FAIL {rel}: source constants {missing} not found")
                failures += 1
                continue
            src = "".join(own.get(p, shared.get(p)) for p in parts)
            names = re.findall(r'"(\w+)"', c.group(3))
            rc, log, ptx = compile_ptx(lib, src, rel)
            modules += 1
            absent = [k for k in names if not re.search(rf"\.entry\s+{k}\s*\(", ptx)]
            if rc != 0 or absent:
                print(f"FAIL {rel} ({' + '.join(parts)}): NVRTC result {rc}; kernels not in the PTX: {absent}\n{log}")
                failures += 1
            else:
                print(f"ok   {rel} ({' + '.join(parts)}): {', '.join(names)}")
    if modules == 0:
        print("FAIL: no KernelSet sources found")
        failures += 1
    print("nvrtc_check: " + ("all CUDA sources compile" if failures == 0 else f"{failures} failure(s)"))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
