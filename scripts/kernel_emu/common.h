#include <vector>
#include <random>
#include <cstdio>
#include <cstdint>
#include <string>
// An MLX-packed [rows, cols] matrix: words (bits-wide values, low first), bf16 scales and biases per group.
struct Mat {
  int rows, cols, bits, group;
  std::vector<uint32_t> q; std::vector<uint16_t> s, b;
  float w(int r, int c) const {
    int per = 32 / bits; uint32_t word = q[((size_t)r * cols + c) / per];
    uint32_t v = (word >> (((size_t)r * cols + c) % per * bits)) & ((1u << bits) - 1u);
    size_t g = ((size_t)r * cols + c) / group;
    return bf(s[g]) * (float)v + bf(b[g]);
  }
  static float bf(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
  Packed packed() const { return Packed{(unsigned long long)q.data(), (unsigned long long)s.data(), (unsigned long long)b.data()}; }
};
static uint16_t to_bf(float f) { uint32_t u; memcpy(&u, &f, 4); return (uint16_t)(u >> 16); }
static Mat make(std::mt19937& g, int rows, int cols, int bits, int group) {
  Mat m{rows, cols, bits, group};
  std::uniform_int_distribution<uint32_t> u32;
  std::normal_distribution<float> n(0.f, 1.f);
  m.q.resize((size_t)rows * cols * bits / 32);
  for (auto& w : m.q) w = u32(g);
  size_t gs = (size_t)rows * cols / group;
  for (size_t i = 0; i < gs; ++i) { m.s.push_back(to_bf(0.01f + 0.02f * std::fabs(n(g)))); m.b.push_back(to_bf(-0.1f * n(g))); }
  return m;
}
static std::vector<float> randv(std::mt19937& g, int n) { std::normal_distribution<float> d(0.f, 1.f); std::vector<float> v(n); for (auto& x : v) x = d(g); return v; }
static double ref_dot(const Mat& m, int r, const float* x) { double a = 0; for (int c = 0; c < m.cols; ++c) a += (double)m.w(r, c) * x[c]; return a; }
static double rel(const std::vector<double>& want, const float* got) {
  double num = 0, den = 0; for (size_t i = 0; i < want.size(); ++i) { double d = got[i] - want[i]; num += d * d; den += want[i] * want[i]; }
  return std::sqrt(num / (den + 1e-30));
}
static int fails = 0;
static void report(const char* what, double e, double tol = 2e-6) { printf("%-48s rel L2 %.2e %s\n", what, e, e <= tol ? "ok" : "FAIL"); if (!(e <= tol)) ++fails; }
// The engine's grid (one row a warp, at most the blocks the GPU holds at once), with 5 standing
// for the resident blocks so that warps loop over several rows here.
static unsigned int row_blocks(int rows) { int b = (rows + 7) / 8; return b < 1 ? 1 : (b > 5 ? 5 : b); }
static unsigned int x_bytes(int cols) { return 4 * (cols + (cols + 31) / 32 * 4); }
