#include "k_mla.h"
#include "common.h"
#include <cstdlib>
int main(int argc, char** argv) {
  int ci = argc > 1 ? atoi(argv[1]) : 0;
  struct Case { int heads, R, K, stride, bits, group; const char* name; };
  Case cases[] = {{4, 64, 192, 256, 4, 64, "mla_head_rows embed_q-like (K 192, stride 256)"}, {4, 32, 512, 512, 4, 64, "mla_head_rows unembed_out-like (K 512)"},
                  {3, 16, 48, 64, 4, 16, "mla_head_rows word path"}, {20, 256, 512, 512, 4, 64, "mla_head_rows GLM-4.7-Flash unembed_out"},
                  {3, 37, 192, 192, 4, 32, "mla_head_rows K 192, R 37 (rows past R in the last block)"}, {2, 20, 1024, 1024, 4, 64, "mla_head_rows K 1024 (a warp a row)"}};
  // lanes a row (the host's head_lanes: 4-bit runs of K up to 256 / 512 share a warp)
  auto lanes = [](const Case& c) { return c.bits == 4 && c.K % 32 == 0 && c.group % 32 == 0 && (c.group & (c.group - 1)) == 0 ? (c.K <= 256 ? 8 : c.K <= 512 ? 16 : 32) : 32; };
  if (ci >= (int)(sizeof(cases) / sizeof(cases[0]))) return 2;
  Case c = cases[ci];
  std::mt19937 g(5 + ci);
  Mat m = make(g, c.heads * c.R, c.K, c.bits, c.group);
  std::vector<float> in = randv(g, c.heads * c.stride), out(c.heads * c.R);
  std::vector<double> want(c.heads * c.R);
  for (int h = 0; h < c.heads; ++h) for (int r = 0; r < c.R; ++r) want[h * c.R + r] = ref_dot(m, h * c.R + r, in.data() + h * c.stride);
  hipLaunchKernelGGL(mla_head_rows, dim3(c.heads, (c.R + 256 / lanes(c) - 1) / (256 / lanes(c))), dim3(256), x_bytes(c.K), 0, m.packed(), 2u, (unsigned)c.bits, (unsigned)c.group,
                     in.data(), (unsigned)c.stride, (unsigned)c.R, (unsigned)c.K, out.data());
  hipDeviceSynchronize();
  report(c.name, rel(want, out.data()));
  return fails != 0;
}
