// What a decode step's access pattern costs harness's 4-bit × int8 row kernel on this CPU.
//
// A decode step reads each routed expert's matrices once, 256 KB of words at a time from
// wherever the expert sits, so the kernel streams short matrices in random order, not one long
// array. This times the kernel's arithmetic (harness's `int8x2` form: 8 lanes of 8 columns,
// two int8 parts combined as 254·n1 + n2, bf16 scales; VNNI `dpbusd` where the CPU has
// AVX512-VNNI, else AVX2 `maddubs`) on 512 × 1024 matrices (MLX groups of 64), one input:
//   hot         the same 4 matrices again and again (1 MB: in cache, the arithmetic alone);
//   pool        35 matrices a "step" drawn at random from a 400 MB pool (a decode step's experts);
// with the words prefetched 2, 4 or 8 KB ahead, with one int8 part (harness's `int8`), and with
// two matrices' rows side by side in one loop (an expert's gate and up on one input); and, as
// the floor, a plain read of the same matrices (64-byte loads summed, no arithmetic).
// Every variant runs once per round, 200 rounds in turn (this VM's speed drifts by the
// minute); prints ns per row × 64 columns and each variant's time ÷ the two-part 2 KB form.
// Build and run: scripts/peers/q4_stream.sh
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define COLS 1024
#define CH (COLS / 64)
#define ROWS 512
#define MW ((size_t)ROWS * CH * 32) /* bytes of words per matrix */
#define POOL 1600                   /* matrices in the pool: 400 MB of words */
#define STEP 35                     /* matrices a step: 7 MoE layers × 5 experts */
#define ROUNDS 200

typedef struct {
    int8_t q[COLS], q2[COLS];
    float d[CH * 8];
} Input;

static int vnni;
static volatile float sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

#define TGT __attribute__((target("avx2,fma,avx512f,avx512vl,avx512vnni")))
#define INL static inline __attribute__((always_inline))

static inline float bf16(uint16_t h) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)h << 16;
    return c.f;
}

TGT static float reduce8(__m256 v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

// One int8 part's lane sums of a chunk: lane k = word k's low nibbles × even bytes of q plus its
// high nibbles × odd bytes (harness's order), by VNNI or by AVX2.
TGT INL __m256i part(__m256i lo, __m256i hi, const int8_t *q, int c, const int vn) {
    __m256i qe = _mm256_loadu_si256((const __m256i *)(q + c * 64));
    __m256i qo = _mm256_loadu_si256((const __m256i *)(q + c * 64 + 32));
    if (vn)
        return _mm256_dpbusd_epi32(_mm256_dpbusd_epi32(_mm256_setzero_si256(), lo, qe), hi, qo);
    __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, qe), _mm256_maddubs_epi16(hi, qo));
    return _mm256_madd_epi16(p, _mm256_set1_epi16(1));
}

// Chunk c of the row at wp into the row's accumulator.
TGT INL __m256 chunk(__m256 tot, const uint8_t *wp, float s, const Input *x, int c, int two, int pf,
                     const int vn) {
    const __m256i low = _mm256_set1_epi8(15);
    _mm_prefetch((const char *)wp + c * 32 + pf, _MM_HINT_T0);
    __m256i v = _mm256_loadu_si256((const __m256i *)(wp + c * 32));
    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
    __m256i n = part(lo, hi, x->q, c, vn);
    if (two)
        n = _mm256_add_epi32(_mm256_sub_epi32(_mm256_slli_epi32(n, 8), _mm256_slli_epi32(n, 1)),
                             part(lo, hi, x->q2, c, vn));
    __m256 d = _mm256_mul_ps(_mm256_loadu_ps(x->d + c * 8), _mm256_set1_ps(s));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(n), d, tot);
}

// One matrix (or two side by side when w2) against the input; `vn`: VNNI sums (a constant in
// each of the two copies below, so no branch is left in the loop).
TGT INL void rows_any(const uint8_t *w, const uint16_t *s, const uint8_t *w2, const uint16_t *s2,
                      const Input *x, float *out, int two, int pf, const int vn) {
    for (int j = 0; j < ROWS; j++) {
        __m256 t = _mm256_setzero_ps(), t2 = _mm256_setzero_ps();
        const uint8_t *wp = w + (size_t)j * CH * 32, *wp2 = w2 ? w2 + (size_t)j * CH * 32 : 0;
        for (int c = 0; c < CH; c++) {
            t = chunk(t, wp, bf16(s[j * CH + c]), x, c, two, pf, vn);
            if (w2) t2 = chunk(t2, wp2, bf16(s2[j * CH + c]), x, c, two, pf, vn);
        }
        out[j] = reduce8(t) + (w2 ? reduce8(t2) : 0);
    }
}

// The variants as separate functions (`vn`, `two` and the pairing constant in each), so that no
// branch is left in their loops.
#define ROWS_FN(NAME, VN, TWO, PAIR)                                                             \
    TGT static void NAME(const uint8_t *w, const uint16_t *s, const uint8_t *w2,               \
                         const uint16_t *s2, const Input *x, float *out, int pf) {              \
        rows_any(w, s, PAIR ? w2 : 0, PAIR ? s2 : 0, x, out, TWO, pf, VN);                      \
    }
ROWS_FN(two_vnni, 1, 1, 0)
ROWS_FN(one_vnni, 1, 0, 0)
ROWS_FN(pair_vnni, 1, 1, 1)
ROWS_FN(two_avx2, 0, 1, 0)
ROWS_FN(one_avx2, 0, 0, 0)
ROWS_FN(pair_avx2, 0, 1, 1)

typedef void (*RowsFn)(const uint8_t *, const uint16_t *, const uint8_t *, const uint16_t *,
                       const Input *, float *, int);

static void rows(RowsFn f, const uint8_t *w, const uint16_t *s, const uint8_t *w2,
                 const uint16_t *s2, const Input *x, float *out, int pf) {
    f(w, s, w2, s2, x, out, pf);
    sink = out[ROWS - 1];
}

TGT static void plain_read(const uint8_t *w, float *out) {
    __m256i a = _mm256_setzero_si256();
    for (size_t i = 0; i < MW; i += 64)
        a = _mm256_add_epi64(a, _mm256_add_epi64(_mm256_loadu_si256((const __m256i *)(w + i)),
                                                 _mm256_loadu_si256((const __m256i *)(w + i + 32))));
    out[0] = (float)_mm256_extract_epi64(a, 0);
    sink = out[0];
}

enum { TWO_2K, TWO_4K, TWO_8K, ONE_4K, PAIR_4K, READ, NV };
static const char *names[NV] = {"two parts, prefetch 2 KB (harness before 2026-12-04)",
                                "two parts, prefetch 4 KB (harness now)",
                                "two parts, prefetch 8 KB",
                                "one part (`int8`), prefetch 4 KB",
                                "two parts, two matrices side by side, prefetch 4 KB",
                                "plain read, no arithmetic (the floor)"};

int main(void) {
    vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        fprintf(stderr, "q4_stream_bench: this CPU has no AVX2 + FMA\n");
        return 1;
    }
    uint8_t *w = aligned_alloc(64, POOL * MW);
    uint16_t *s = malloc((size_t)POOL * ROWS * CH * sizeof(uint16_t));
    if (!w || !s) return 1;
    for (size_t i = 0; i < POOL * MW; i++) w[i] = (uint8_t)(i * 2654435761u >> 13);
    for (size_t i = 0; i < (size_t)POOL * ROWS * CH; i++) s[i] = 0x3c00 + (uint16_t)(i % 64);
    Input x;
    for (int i = 0; i < COLS; i++) x.q[i] = (int8_t)(i % 255 - 127), x.q2[i] = (int8_t)(i * 7 % 255 - 127);
    for (int i = 0; i < CH * 8; i++) x.d[i] = 0.01f;
    float out[ROWS];
    const int pf[NV] = {2048, 4096, 8192, 4096, 4096, 0};
    for (int hot = 1; hot >= 0; hot--) {
        double t[NV] = {0};
        unsigned seed = 1;
        for (int r = 0; r < ROUNDS; r++) {
            for (int v = 0; v < NV; v++) {
                double t0 = now();
                for (int k = 0; k < STEP; k += (v == PAIR_4K ? 2 : 1)) {
                    seed = seed * 1103515245u + 12345u;
                    size_t m = hot ? (size_t)(k % 4) : (seed >> 8) % POOL;
                    size_t m2 = hot ? (size_t)((k + 1) % 4) : (m * 7 + 13) % POOL;
                    const uint8_t *wm = w + m * MW;
                    const uint16_t *sm = s + m * ROWS * CH;
                    RowsFn f = v == PAIR_4K  ? (vnni ? pair_vnni : pair_avx2)
                               : v == ONE_4K ? (vnni ? one_vnni : one_avx2)
                                             : (vnni ? two_vnni : two_avx2);
                    if (v == READ) plain_read(wm, out);
                    else rows(f, wm, sm, w + m2 * MW, s + m2 * ROWS * CH, &x, out, pf[v]);
                }
                t[v] += now() - t0;
            }
        }
        // PAIR_4K runs ceil(STEP / 2) pairs: STEP + 1 matrices a round.
        for (int v = 0; v < NV; v++) {
            double mats = v == PAIR_4K ? 2.0 * ((STEP + 1) / 2) : STEP;
            double ns = t[v] / ROUNDS / (mats * ROWS * CH) * 1e9;
            double base = t[TWO_2K] / ROUNDS / (STEP * (double)ROWS * CH) * 1e9;
            printf("| %s | %s | %.2f | %.2f |\n", hot ? "hot (1 MB, in cache)" : "pool (random 256 KB matrices of 400 MB)",
                   names[v], ns, ns / base);
        }
    }
    printf("\nint8 sums by %s\n", vnni ? "AVX512-VNNI" : "AVX2");
    return 0;
}
