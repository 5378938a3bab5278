#include "k_fill.h"
#include "common.h"
#include <cstdlib>
// The copies a MoE gate makes (`gate_fill`, src/experts/upload/fused.rs) against memcpy: every
// source alignment (0..15 bytes past 16) by lengths from 0 to past a grid's stride, into a
// 256-byte-aligned destination (as an expert buffer's parts are); bytes past the range untouched.
__global__ void fill(const unsigned char* src, unsigned char* dst, unsigned long long len) {
  unsigned long long tid = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x;
  gate_fill(src, dst, len, tid, (unsigned long long)gridDim.x * blockDim.x);
}
int main(int argc, char** argv) {
  int ci = argc > 1 ? atoi(argv[1]) : 0;
  const unsigned long long lens[] = {0, 1, 7, 8, 9, 100, 4099, 70001};
  if (ci >= 16 * 8) return 2;
  unsigned mis = ci % 16;
  unsigned long long len = lens[ci / 16];
  std::mt19937 g(5 + ci);
  // Sources inside a larger buffer, so reads of the aligned words around the range stay inside it.
  std::vector<unsigned char> host(len + 64);
  for (auto& b : host) b = (unsigned char)(g() & 255u);
  alignas(256) static unsigned char out[70001 + 512];
  std::memset(out, 0xA5, sizeof out);
  const unsigned char* src = host.data() + 16 - ((unsigned long long)host.data() & 15ull) + mis;
  if (src + len > host.data() + host.size()) { printf("fill: bad case\n"); return 1; }
  hipLaunchKernelGGL(fill, dim3(3), dim3(64), 0, 0, src, out, len);
  hipDeviceSynchronize();
  bool ok = std::memcmp(out, src, len) == 0;
  for (unsigned long long i = len; i < len + 64; ++i) ok = ok && out[i] == 0xA5;
  printf("gate_fill source +%2u mod 16, %6llu bytes %s\n", mis, len, ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}
