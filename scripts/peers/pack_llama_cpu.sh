#!/usr/bin/env bash
# Packs a CPU-only llama.cpp build (llama-bench, llama-quantize: static ggml, AVX2 + FMA + F16C and
# AVX-512 with its VNNI / BF16 / VBMI extensions, AMX off, no native flags, so it runs on any x86-64
# CPU with those) and llama.cpp's converter of the same tree as .gpu/llama-cpu.tar.xz, which
# scripts/gpu_cpu_peers.sh prefers to the CUDA pack's AVX2-only CPU backend: the GPU machine's host
# has AVX-512 and VNNI, and so do harness's int8 kernels there.
# Usage: bash scripts/peers/pack_llama_cpu.sh [WORKDIR]   (default /tmp/llama-cpu; ~10 min on 2 cores)
set -eu
w=${1:-/tmp/llama-cpu}
repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -d "$w/llama.cpp" ] || python3 "$repo/scripts/peers/fetch_llama_cpp.py" "$w"
command -v cmake > /dev/null || python3 -m pip install -q cmake
if [ ! -x "$w/build/bin/llama-bench" ]; then
  cmake -S "$w/llama.cpp" -B "$w/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DGGML_AVX=ON \
    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON \
    -DGGML_AVX512_BF16=ON -DGGML_AVX512_VBMI=ON -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF \
    -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DBUILD_SHARED_LIBS=OFF > "$w/cmake.log"
  cmake --build "$w/build" -j"$(nproc)" --target llama-bench llama-quantize > "$w/build.log"
fi
p=$w/pack; rm -rf "$p"; mkdir -p "$p/bin"
cp "$w"/build/bin/llama-bench "$w"/build/bin/llama-quantize "$p/bin/"
strip "$p"/bin/*
cp -r "$w/llama.cpp/convert_hf_to_gguf.py" "$w/llama.cpp/gguf-py" "$w/llama.cpp/conversion" "$p/"
mkdir -p "$repo/.gpu"
tar -cJf "$repo/.gpu/llama-cpu.tar.xz" -C "$p" .
ls -la "$repo/.gpu/llama-cpu.tar.xz"
