#include "k_matrix.h"
#include "common.h"
#include <cstdlib>
#include <cstring>
int main(int argc, char** argv) {
  int only = argc > 1 ? atoi(argv[1]) : 0;
  std::mt19937 g(7 + only);
  struct Case { int rows, cols, bits, group; bool norm; const char* name; };
  Case cases[] = {{40, 2048, 4, 64, false, "4-bit 2048 cols (runs path)"}, {33, 5120, 4, 64, false, "4-bit 5120 cols"},
                  {40, 2048, 4, 64, true, "4-bit 2048 cols, RMS norm inside"}, {24, 512, 4, 32, true, "4-bit group 32, norm"},
                  {24, 48, 4, 16, false, "4-bit 48 cols (word path)"}, {24, 1024, 8, 64, false, "8-bit"}, {24, 1024, 2, 64, false, "2-bit"},
                  {24, 40, 4, 8, true, "4-bit 40 cols, norm (word path)"}, {24, 512, 4, 32, false, "4-bit group 32"}, {24, 512, 4, 64, true, "4-bit 512 cols, norm"}, {24, 2048, 4, 32, false, "4-bit 2048 cols, group 32"}};
  for (int ci = 0; ci < (int)(sizeof(cases)/sizeof(cases[0])); ++ci) { if (ci != only) continue; auto& c = cases[ci];
    Mat m = make(g, c.rows, c.cols, c.bits, c.group);
    std::vector<float> x = randv(g, c.cols), nw = randv(g, c.cols), y(c.rows);
    float eps = 1e-6f;
    std::vector<float> xn = x;
    if (c.norm) { double ss = 0; for (float v : x) ss += (double)v * v; float sc = 1.0f / std::sqrt((float)(ss / c.cols) + eps); for (int i = 0; i < c.cols; ++i) xn[i] = sc * x[i] * nw[i]; }
    std::vector<double> want(c.rows); for (int r = 0; r < c.rows; ++r) want[r] = ref_dot(m, r, xn.data());
    hipLaunchKernelGGL(packed_matvec, dim3(row_blocks(c.rows)), dim3(256), x_bytes(c.cols), 0, m.packed(), 2u, x.data(), y.data(),
                       (unsigned)c.rows, (unsigned)c.cols, 1u, (unsigned)c.bits, (unsigned)c.group, c.norm ? nw.data() : (const float*)nullptr, eps);
    hipDeviceSynchronize();
    report(c.name, rel(want, y.data()));
  }
  int nc = (int)(sizeof(cases) / sizeof(cases[0]));
  if (only == nc) {
    // packed_rows: a row given by value, the same row by an id in device memory (a CUDA graph's
    // embedding of its token), and an id past the table (the last row, not past the buffer).
    Mat m = make(g, 37, 256, 4, 64);
    size_t so = m.q.size() * 4, bo = so + m.s.size() * 2;
    std::vector<unsigned char> buf(bo + m.b.size() * 2);
    memcpy(buf.data(), m.q.data(), so); memcpy(buf.data() + so, m.s.data(), m.s.size() * 2); memcpy(buf.data() + bo, m.b.data(), m.b.size() * 2);
    Ids ids{}; ids.id[0] = 29;
    std::vector<unsigned> at{29u}, past{42u};
    std::vector<float> byval(m.cols), byat(m.cols), clamped(m.cols);
    auto run = [&](const unsigned* a, float* out) {
      hipLaunchKernelGGL(packed_rows, dim3(1), dim3(256), 0, 0, buf.data(), 0ull, (unsigned long long)so, (unsigned long long)bo, 2u, ids,
                         0xffffffffu, 1u, out, (unsigned)m.cols, 4u, 64u, a, 37u);
      hipDeviceSynchronize();
    };
    run(nullptr, byval.data());
    ids.id[0] = 5;  // what a kernel ignoring `at` would read
    run(at.data(), byat.data()); run(past.data(), clamped.data());
    std::vector<double> w29(m.cols), w36(m.cols);
    for (int c = 0; c < m.cols; ++c) { w29[c] = m.w(29, c); w36[c] = m.w(36, c); }
    report("packed_rows row 29 by value", rel(w29, byval.data()));
    report("packed_rows row 29 by device id (= by value)", memcmp(byval.data(), byat.data(), byat.size() * 4) == 0 ? 0.0 : 1.0);
    report("packed_rows id past the table: the last row", rel(w36, clamped.data()));
    return fails != 0;
  }
  if (only > nc) return 2;
  return fails != 0;
}
