#include "k_fused.h"
#include "common.h"
#include <cstdlib>
int main(int argc, char** argv) {
  int ci = argc > 1 ? atoi(argv[1]) : 0;
  struct Case { int hidden, inter, bits, group, k; const char* name; };
  Case cases[] = {{256, 192, 4, 64, 5, "fused 4-bit runs path, 4 routed + shared"}, {2048, 1536, 4, 64, 5, "fused 4-bit GLM-4.7-Flash shape"},
                  {96, 48, 4, 16, 3, "fused 4-bit word path"}, {256, 128, 8, 64, 3, "fused 8-bit"}};
  if (ci >= (int)(sizeof(cases) / sizeof(cases[0]))) return 2;
  Case c = cases[ci];
  std::mt19937 g(11 + ci);
  std::vector<Mat> gate, up, down;
  Experts t{};
  std::vector<float> wts;
  for (int e = 0; e < c.k; ++e) {
    gate.push_back(make(g, c.inter, c.hidden, c.bits, c.group)); up.push_back(make(g, c.inter, c.hidden, c.bits, c.group));
    down.push_back(make(g, c.hidden, c.inter, c.bits, c.group));
  }
  for (int e = 0; e < c.k; ++e) { t.gate[e] = gate[e].packed(); t.up[e] = up[e].packed(); t.down[e] = down[e].packed(); t.w[e] = e + 1 < c.k ? 0.1f * (e + 1) : 1.0f; }
  std::vector<float> x = randv(g, c.hidden), act(c.k * c.inter), part(c.k * c.hidden), y(c.hidden);
  std::vector<unsigned int> done(4096, 0);
  // reference
  std::vector<double> ya(c.hidden, 0.0);
  std::vector<double> acts(c.k * c.inter);
  for (int e = 0; e < c.k; ++e) for (int r = 0; r < c.inter; ++r) { double gv = ref_dot(gate[e], r, x.data()), uv = ref_dot(up[e], r, x.data()); acts[e * c.inter + r] = gv / (1.0 + std::exp(-gv)) * uv; }
  std::vector<float> actf(acts.begin(), acts.end());
  for (int e = 0; e < c.k; ++e) for (int r = 0; r < c.hidden; ++r) ya[r] += t.w[e] * ref_dot(down[e], r, actf.data() + e * c.inter);
  hipLaunchKernelGGL(moe_gate_up, dim3(row_blocks(c.k * c.inter)), dim3(256), x_bytes(c.hidden), 0, t, (unsigned)c.k, 2u, 2u, x.data(), act.data(),
                     (unsigned)c.inter, (unsigned)c.hidden, (unsigned)c.bits, (unsigned)c.group);
  hipDeviceSynchronize();
  report((std::string(c.name) + ": gate·up").c_str(), rel(acts, act.data()));
  // tiles of 24 rows: three per warp for some warps, none for others, a partial last tile
  const unsigned tile_rows = 24;
  unsigned tiles = (c.hidden + tile_rows - 1) / tile_rows;
  hipLaunchKernelGGL(moe_down, dim3(tiles, c.k), dim3(256), x_bytes(c.inter), 0, t, (unsigned)c.k, 2u, act.data(), part.data(), done.data(), y.data(),
                     (unsigned)c.hidden, (unsigned)c.inter, (unsigned)c.bits, (unsigned)c.group, tile_rows);
  hipDeviceSynchronize();
  // down's reference from the kernel's own activations (isolates the down kernel)
  std::vector<double> yb(c.hidden, 0.0);
  for (int e = 0; e < c.k; ++e) for (int r = 0; r < c.hidden; ++r) yb[r] += t.w[e] * ref_dot(down[e], r, act.data() + e * c.inter);
  report((std::string(c.name) + ": down").c_str(), rel(yb, y.data()));
  report((std::string(c.name) + ": whole").c_str(), rel(ya, y.data()), 1e-5);
  bool zero = true; for (unsigned i = 0; i < tiles; ++i) zero &= done[i] == 0; report("tile counters back to 0", zero ? 0.0 : 1.0);
  return fails != 0;
}
