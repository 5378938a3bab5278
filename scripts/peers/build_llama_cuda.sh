#!/usr/bin/env bash
# Builds llama.cpp's CUDA `llama-bench` and `llama-quantize` for the GPU machine (sm_90) here, with
# the CUDA 13.0 wheels of ../shared/tools/cuda-env.sh, and packs them with llama.cpp's converter of
# the same tree as .gpu/llama-cuda.tar.xz (what scripts/gpu_peers.sh unpacks). The source is the
# tree PyPI's `llama-cpp-python` sdist ships (scripts/peers/fetch_llama_cpp.py).
# Usage: bash scripts/peers/build_llama_cuda.sh [WORKDIR]   (default /tmp/llama; about an hour on 2 cores)
set -eu
w=${1:-/tmp/llama}
repo=$(cd "$(dirname "$0")/../.." && pwd)
[ -d "$w/llama.cpp" ] || python3 "$repo/scripts/peers/fetch_llama_cpp.py" "$w"
source "$repo/../shared/tools/cuda-env.sh"
command -v cmake > /dev/null || python3 -m pip install -q cmake   # cmake from PyPI where the OS has none
# The wheels' nvcc finds its headers and libraries through CUDA_HOME; cmake's CUDA toolkit search
# needs the stub libcuda on the link path (the GPU machine has the real one).
cmake -S "$w/llama.cpp" -B "$w/build" -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DGGML_CUDA_NO_VMM=ON \
  -DCMAKE_CUDA_COMPILER="$CUDA_HOME/bin/nvcc" -DCUDAToolkit_ROOT="$CUDA_HOME" -DGGML_NATIVE=OFF -DGGML_AVX2=ON \
  -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DCMAKE_BUILD_TYPE=Release > "$w/cmake.log" 2>&1
# The executables link through libggml-cuda, whose CUDA runtime the linker must find too.
export LD_LIBRARY_PATH=$CUDA_HOME/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
cmake --build "$w/build" --target llama-bench llama-quantize -j 2 > "$w/build.log" 2>&1
p=$w/pack; rm -rf "$p"; mkdir -p "$p/bin"
cp "$w"/build/bin/llama-bench "$w"/build/bin/llama-quantize "$p/bin/"
cp -P "$w"/build/bin/*.so* "$p/bin/" 2>/dev/null || true
find "$w/build" -name "*.so*" -path "*ggml*" -exec cp -P {} "$p/bin/" \; 2>/dev/null || true
find "$w/build" -name "libllama.so*" -exec cp -P {} "$p/bin/" \; 2>/dev/null || true
cp -r "$w/llama.cpp/convert_hf_to_gguf.py" "$w/llama.cpp/gguf-py" "$p/"
[ -d "$w/llama.cpp/conversion" ] && cp -r "$w/llama.cpp/conversion" "$p/"
strip "$p"/bin/llama-bench "$p"/bin/llama-quantize "$p"/bin/*.so* 2>/dev/null || true
mkdir -p "$repo/.gpu"
tar -cJf "$repo/.gpu/llama-cuda.tar.xz" -C "$p" .
ls -la "$repo/.gpu/llama-cuda.tar.xz"
