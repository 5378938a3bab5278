#include "k_argmax.h"
#include "common.h"
#include <cstdlib>
#include <limits>
// The greedy token kernels (argmax_part, then argmax_final) against the host's rule
// (src/models/layers.rs `argmax`): first index of the maximum, NaN never chosen, 0 when v[0] is NaN.
static unsigned host_argmax(const std::vector<float>& v) { size_t b = 0; for (size_t i = 0; i < v.size(); ++i) if (v[i] > v[b]) b = i; return (unsigned)b; }
int main(int argc, char** argv) {
  int ci = argc > 1 ? atoi(argv[1]) : 0;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const char* names[] = {"argmax 154880 values, the maximum twice", "argmax with NaNs, the maximum after them", "argmax NaN first", "argmax all equal", "argmax 100 values (fewer than a block)"};
  if (ci >= 5) return 2;
  std::mt19937 g(11 + ci);
  size_t n = ci == 4 ? 100 : 154880;
  std::vector<float> v = randv(g, (int)n);
  if (ci == 0) { v[40000] = 9.0f; v[150000] = 9.0f; v[33] = 8.99f; }
  if (ci == 1) { for (size_t i = 1; i < n; i += 97) v[i] = nan; v[123457] = 7.5f; v[5] = nan; }
  if (ci == 2) { v[0] = nan; v[77] = 50.0f; }
  if (ci == 3) for (auto& x : v) x = 1.25f;
  const unsigned threads = 256, max_parts = 128;
  unsigned parts = (unsigned)std::min<size_t>((n + threads - 1) / threads, max_parts);
  std::vector<float> pv(parts); std::vector<unsigned> pi(parts), out(1, 12345u);
  hipLaunchKernelGGL(argmax_part, dim3(parts), dim3(threads), 0, 0, v.data(), (unsigned)n, pv.data(), pi.data());
  hipDeviceSynchronize();
  // Odd cases also advance a position (the end of a captured decode step), even ones pass null.
  std::vector<unsigned> pos(1, 41u);
  unsigned* pp = ci % 2 ? pos.data() : nullptr;
  hipLaunchKernelGGL(argmax_final, dim3(1), dim3(max_parts), 0, 0, v.data(), pv.data(), pi.data(), parts, out.data(), pp);
  hipDeviceSynchronize();
  unsigned want = host_argmax(v);
  bool ok = out[0] == want && pos[0] == (pp ? 42u : 41u);
  printf("%-48s device %u host %u, position %u %s\n", names[ci], out[0], want, pos[0], ok ? "ok" : "FAIL");
  return ok ? 0 : 1;
}
