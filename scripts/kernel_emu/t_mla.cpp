#include "k_mla.h"
#include "common.h"
#include <cstdlib>
int main(int argc, char** argv) {
  int ci = argc > 1 ? atoi(argv[1]) : 0;
  // lanes: what the host passes (its head_lanes: K up to 256 / 512 share a warp); the last two
  // cases ask for lanes the shape does not take that way, which must change nothing but speed.
  struct Case { int heads, R, K, stride, bits, group; unsigned lanes; const char* name; };
  Case cases[] = {{4, 64, 192, 256, 4, 64, 8, "mla_head_rows embed_q-like (K 192, stride 256)"}, {4, 32, 512, 512, 4, 64, 16, "mla_head_rows unembed_out-like (K 512)"},
                  {3, 16, 48, 64, 4, 16, 8, "mla_head_rows word path"}, {20, 256, 512, 512, 4, 64, 16, "mla_head_rows GLM-4.7-Flash unembed_out"},
                  {3, 37, 192, 192, 4, 32, 8, "mla_head_rows K 192, R 37 (rows past R in the last block)"}, {2, 20, 1024, 1024, 4, 64, 32, "mla_head_rows K 1024 (a warp a row)"},
                  {3, 40, 48, 64, 4, 16, 16, "mla_head_rows word path, 16 lanes asked"}, {2, 24, 192, 192, 4, 64, 32, "mla_head_rows K 192, 32 lanes asked"}};
  if (ci >= (int)(sizeof(cases) / sizeof(cases[0]))) return 2;
  Case c = cases[ci];
  std::mt19937 g(5 + ci);
  Mat m = make(g, c.heads * c.R, c.K, c.bits, c.group);
  std::vector<float> in = randv(g, c.heads * c.stride), out(c.heads * c.R);
  std::vector<double> want(c.heads * c.R);
  for (int h = 0; h < c.heads; ++h) for (int r = 0; r < c.R; ++r) want[h * c.R + r] = ref_dot(m, h * c.R + r, in.data() + h * c.stride);
  unsigned per = 256 / c.lanes;
  hipLaunchKernelGGL(mla_head_rows, dim3(c.heads, (c.R + per - 1) / per), dim3(256), x_bytes(c.K), 0, m.packed(), 2u, (unsigned)c.bits, (unsigned)c.group,
                     in.data(), (unsigned)c.stride, (unsigned)c.R, (unsigned)c.K, c.lanes, out.data());
  hipDeviceSynchronize();
  report(c.name, rel(want, out.data()));
  return fails != 0;
}
