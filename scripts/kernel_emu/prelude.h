#include <hip/hip_runtime.h>
#include <cstring>
#include <cmath>
#undef __device__
#define __device__
#undef __forceinline__
#define __forceinline__ inline
static inline float __uint_as_float(unsigned int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; std::memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int u) { float f; std::memcpy(&f, &u, 4); return f; }
static inline float __fmul_rn(float a, float b) { return a * b; }
static inline float __fadd_rn(float a, float b) { return a + b; }
#define __shfl_xor_sync(m, v, o) __shfl_xor((v), (o))
// A width argument is dropped: HIP-CPU's width shuffles return the lane's own value outside the
// first segment (it compares the source lane with the width). A full-width shuffle down gives the
// same sum at lane 0 of every segment, the only lane the kernels read.
#define __shfl_down_sync(m, v, o, ...) __shfl_down((v), (o))
#define __syncwarp() ((void)0)
#define __ldcg(p) (*(p))
static inline float rsqrtf(float v) { return 1.0f / std::sqrt(v); }
static inline unsigned int min(unsigned int a, unsigned int b) { return a < b ? a : b; }
