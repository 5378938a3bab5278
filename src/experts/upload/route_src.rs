//! CUDA source of the router kernels (see [`super::routed`]): `moe_route` chooses a token's
//! experts from router logits already computed; `moe_router` computes the logits too, for the
//! layer's router and, with lookahead, the next MoE layer's on its normalised input, and
//! chooses both routes in the same launch.

/// `moe_route` and `moe_router`.
pub(super) const ROUTE_SRC: &str = r#"
// Whether (v, i) ranks before (bv, bi): larger value first, lower index first on ties; an
// empty candidate (index 0xffffffff) ranks last (the host's `top_k`).
__device__ __forceinline__ bool before(float v, unsigned int i, float bv, unsigned int bi) {
return bi == 0xffffffffu || (i != 0xffffffffu && (v > bv || (v == bv && i < bi)));
}

// A route's rule and where it goes: kind 0: softmax, top-k of the probabilities (renormalised
// when `norm`); kind 1: top-k, then their probabilities renormalised (Mixtral); kind 2: sigmoid
// scores, top-k of score + bias within the `topk_group` groups of the largest top-2 sums
// (DeepSeek-V3), weights the scores (renormalised when `norm`) times `scale`. Ids go to
// out[0..k], weight bits to out[k..2k], and, when `launch` is set, the chosen experts'
// addresses (3 per expert in `table`) and weights into entries 0..k of the fused kernels' table.
struct Rule {
const float* router; const float* bias; unsigned int* out; const Packed* table; Experts* launch;
unsigned int n, k, kind, norm, n_group, topk_group; float scale; unsigned int pad;
};

// One token's route from its logits (one warp, n <= 1024 experts, k <= 16, n_group <= 64).
// `logits` may be `src` (each value is read before its own slot is written); `sel` and `src`
// hold n floats each, `ids`, `gs` and `keep` are the warp's own.
__device__ void route_one(const float* logits, const Rule& r, float* sel, float* src,
unsigned int* ids, float* gs, unsigned int* keep, unsigned int lane) {
unsigned int n = r.n, k = r.k;
if (r.kind < 2u) {
    float m = __int_as_float(0xff800000);
    for (unsigned int i = lane; i < n; i += 32u) m = fmaxf(m, logits[i]);
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    float s = 0.0f;
    for (unsigned int i = lane; i < n; i += 32u) {
        float e = expf(logits[i] - m);
        src[i] = e;
        s += e;
    }
    for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    for (unsigned int i = lane; i < n; i += 32u) {
        float p = src[i] / s;
        src[i] = p;
        sel[i] = p;
    }
} else {
    for (unsigned int i = lane; i < n; i += 32u) {
        float c = 1.0f / (1.0f + expf(-logits[i]));
        src[i] = c;
        sel[i] = r.bias ? c + r.bias[i] : c;
    }
    __syncwarp();
    unsigned int per = n / r.n_group;
    for (unsigned int g = lane; g < r.n_group; g += 32u) {
        float a = __int_as_float(0xff800000), b = __int_as_float(0xff800000);
        for (unsigned int j = 0; j < per; ++j) {
            float v = sel[g * per + j];
            if (v > a) { b = a; a = v; } else if (v > b) b = v;
        }
        gs[g] = a + b;
        keep[g] = 0u;
    }
    __syncwarp();
    if (lane == 0u) {
        for (unsigned int t = 0; t < r.topk_group; ++t) {
            unsigned int best = 0xffffffffu;
            float bv = 0.0f;
            for (unsigned int g = 0; g < r.n_group; ++g)
                if (!keep[g] && before(gs[g], g, bv, best)) { best = g; bv = gs[g]; }
            keep[best] = 1u;
        }
    }
    __syncwarp();
    for (unsigned int i = lane; i < n; i += 32u)
        if (!keep[i / per]) sel[i] = __int_as_float(0xff800000);
}
__syncwarp();
for (unsigned int t = 0; t < k; ++t) {
    float bv = 0.0f;
    unsigned int bi = 0xffffffffu;
    for (unsigned int i = lane; i < n; i += 32u) {
        bool taken = false;
        for (unsigned int u = 0; u < t; ++u) taken |= ids[u] == i;
        if (!taken && before(sel[i], i, bv, bi)) { bv = sel[i]; bi = i; }
    }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        unsigned int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (before(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    if (lane == 0u) ids[t] = bi;
    __syncwarp();
}
if (lane == 0u) {
    float wt[16];
    float s = 0.0f;
    for (unsigned int t = 0; t < k; ++t) { wt[t] = src[ids[t]]; s += wt[t]; }
    if (r.kind == 1u || (r.kind == 0u && r.norm))
        for (unsigned int t = 0; t < k; ++t) wt[t] = wt[t] / s;
    if (r.kind == 2u) {
        if (r.norm) {
            s += 1e-20f;
            for (unsigned int t = 0; t < k; ++t) wt[t] = wt[t] / s;
        }
        for (unsigned int t = 0; t < k; ++t) wt[t] = wt[t] * r.scale;
    }
    for (unsigned int t = 0; t < k; ++t) {
        r.out[t] = ids[t];
        r.out[k + t] = __float_as_uint(wt[t]);
        if (r.launch) {
            r.launch->gate[t] = r.table[3u * ids[t]];
            r.launch->up[t] = r.table[3u * ids[t] + 1u];
            r.launch->down[t] = r.table[3u * ids[t] + 2u];
            r.launch->w[t] = wt[t];
        }
    }
}
}

// One token's route from router logits computed before (one warp; shared memory 2n floats).
extern "C" __global__ void moe_route(const float* logits, const Rule r) {
extern __shared__ float sm[];
__shared__ unsigned int ids[16];
__shared__ float gs[64];
__shared__ unsigned int keep[64];
route_one(logits, r, sm, sm + r.n, ids, gs, keep, threadIdx.x);
}

// The router of a MoE layer and its route in one launch. Logit rows: those of `a` (its
// router `a.router` [a.n, cols] times `x`), then, when `two`, those of `b` (the next MoE
// layer's router times rmsnorm(h)·g with `eps`: rstd · Σ w·h·g). Each block takes two rows a
// pass, four warps a row (128 threads over the row in 16-byte words where `vec`: every address
// 16-byte aligned and cols a multiple of 4; else in floats), each row group summing h² over
// the same columns for its rstd; each row into `logits` (a.n + b.n floats of scratch). The last
// block to finish chooses both routes (warp 0 `a`, warp 1 `b`; shared memory 2 (a.n + b.n)
// floats) and returns `counter` to 0. Eight warps a block.
extern "C" __global__ void moe_router(const Rule a, const Rule b, unsigned int two,
const float* x, const float* h, const float* g, float eps, unsigned int cols, unsigned int vec,
float* logits, unsigned int* counter) {
extern __shared__ float sm[];
__shared__ unsigned int ids[2][16];
__shared__ float gs[2][64];
__shared__ unsigned int keep[2][64];
__shared__ float red[8], redq[8];
__shared__ bool last;
unsigned int lane = threadIdx.x & 31u, warp = threadIdx.x >> 5;
unsigned int group = warp >> 2, t = (warp & 3u) * 32u + lane;
unsigned int rows = a.n + (two ? b.n : 0u);
for (unsigned int r0 = blockIdx.x * 2u; r0 < rows; r0 += gridDim.x * 2u) {
    unsigned int row = r0 + group;
    bool first = row < a.n;
    float s = 0.0f, q = 0.0f;
    if (row < rows) {
        const float* w = first ? a.router + (unsigned long long)row * cols
                               : b.router + (unsigned long long)(row - a.n) * cols;
        if (vec) {
            const float4* w4 = (const float4*)w;
            unsigned int c4 = cols >> 2;
            if (first) {
                const float4* x4 = (const float4*)x;
#pragma unroll 4
                for (unsigned int i = t; i < c4; i += 128u) {
                    float4 u = w4[i], v = x4[i];
                    s += u.x * v.x + u.y * v.y + u.z * v.z + u.w * v.w;
                }
            } else {
                const float4* h4 = (const float4*)h;
                const float4* g4 = (const float4*)g;
#pragma unroll 4
                for (unsigned int i = t; i < c4; i += 128u) {
                    float4 u = w4[i], v = h4[i], c = g4[i];
                    s += u.x * (v.x * c.x) + u.y * (v.y * c.y) + u.z * (v.z * c.z) + u.w * (v.w * c.w);
                    q += v.x * v.x + v.y * v.y + v.z * v.z + v.w * v.w;
                }
            }
        } else if (first) {
            for (unsigned int i = t; i < cols; i += 128u) s += w[i] * x[i];
        } else {
            for (unsigned int i = t; i < cols; i += 128u) {
                s += w[i] * (h[i] * g[i]);
                q += h[i] * h[i];
            }
        }
    }
    for (int o = 16; o > 0; o >>= 1) {
        s += __shfl_xor_sync(0xffffffffu, s, o);
        q += __shfl_xor_sync(0xffffffffu, q, o);
    }
    if (lane == 0u) { red[warp] = s; redq[warp] = q; }
    __syncthreads();
    if (threadIdx.x < 2u && r0 + threadIdx.x < rows) {
        unsigned int gi = threadIdx.x * 4u, r = r0 + threadIdx.x;
        float d = (red[gi] + red[gi + 1u]) + (red[gi + 2u] + red[gi + 3u]);
        if (r >= a.n) {
            float ss = (redq[gi] + redq[gi + 1u]) + (redq[gi + 2u] + redq[gi + 3u]);
            d *= rsqrtf(ss / (float)cols + eps);
        }
        logits[r] = d;
    }
    __syncthreads();
}
__threadfence();
__syncthreads();
if (threadIdx.x == 0u) last = atomicAdd(counter, 1u) == gridDim.x - 1u;
__syncthreads();
if (!last) return;
__threadfence();
for (unsigned int i = threadIdx.x; i < rows; i += blockDim.x) sm[i] = __ldcg(logits + i);
__syncthreads();
// sm: the logits of a, then of b; the selection arrays of a after them, then of b.
float* sa = sm + rows;
if (warp == 0u) route_one(sm, a, sa, sm, ids[0], gs[0], keep[0], lane);
if (two && warp == 1u) route_one(sm + a.n, b, sa + a.n, sm + a.n, ids[1], gs[1], keep[1], lane);
if (threadIdx.x == 0u) *counter = 0u;
}
"#;
