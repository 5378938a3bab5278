// What the weights' layout is worth to a 4-bit × int8 matrix-vector product on this CPU (AVX2).
//
// Four kernels over the same MLX-style 4-bit matrix (1024 columns, groups of 64, f32 scales and
// biases here), one input, timed in turn in each round:
//   rows2  harness's `int8x2` form today: one row at a time, 8 lanes of 8 columns, two int8
//          parts per activation (254·q + q2), a horizontal reduction and bias sum per row;
//   rows1  the same with one int8 part (harness's `int8`);
//   tile2  rows stored in tiles of 8 interleaved word by word (lane r of a vector = row r), two
//          parts: each input chunk is broadcast once for 8 rows, the int8 sums of a 32-column
//          block are added in 16 bits, one multiply-add per block for 8 rows, no per-row tail;
//   tile1  the tiled form with one int8 part (the arithmetic of llama.cpp's repacked Q4_0 path).
// Working sets: 1 MB (in cache: the arithmetic's cost) and 300 MB (streamed from memory, as a
// decode step streams its experts). Prints ns per row and 64 columns, and each kernel's ratio to
// rows2 in the same round (this VM's speed drifts between minutes).
// Build and run: scripts/peers/q4_layout.sh
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define COLS 1024
#define CH (COLS / 64)
#define PF 2048

typedef struct {
    int8_t q[COLS], q2[COLS];   // the two parts, even columns of a chunk then odd (harness's order)
    float d[CH * 8];            // lane scales, 8 per chunk (harness's QRow.d)
    float dblk[COLS / 32];      // one scale per 32-column block
    float xsum[CH];             // per-group sums of the quantized input
} Input;

typedef void (*Kernel)(const uint8_t *, const float *, const float *, size_t, const Input *, float *);

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2,fma"))) static float reduce8(__m256 v) {
    float l[8];
    _mm256_storeu_ps(l, v);
    return ((l[0] + l[4]) + (l[2] + l[6])) + ((l[1] + l[5]) + (l[3] + l[7]));
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void rows_any(const uint8_t *w, const float *s,
                                                                const float *b, size_t rows,
                                                                const Input *x, float *out, int two) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), steps = _mm256_set1_epi16(254);
    for (size_t j = 0; j < rows; j++) {
        const uint8_t *wp = w + j * CH * 32;
        __m256 tot = _mm256_setzero_ps();
        for (int c = 0; c < CH; c++) {
            _mm_prefetch((const char *)wp + c * 32 + PF, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(wp + c * 32));
            __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
            __m256i p1 = _mm256_add_epi16(
                _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x->q + c * 64))),
                _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x->q + c * 64 + 32))));
            __m256i sum;
            if (two) {
                __m256i p2 = _mm256_add_epi16(
                    _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x->q2 + c * 64))),
                    _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x->q2 + c * 64 + 32))));
                sum = _mm256_add_epi32(_mm256_madd_epi16(p1, steps), _mm256_madd_epi16(p2, ones));
            } else {
                sum = _mm256_madd_epi16(p1, ones);
            }
            __m256 d = _mm256_mul_ps(_mm256_loadu_ps(x->d + c * 8), _mm256_set1_ps(s[j * CH + c]));
            tot = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), d, tot);
        }
        __m256 bias = _mm256_setzero_ps();
        for (int g = 0; g < CH; g += 8)
            bias = _mm256_fmadd_ps(_mm256_loadu_ps(b + j * CH + g), _mm256_loadu_ps(x->xsum + g), bias);
        out[j] = reduce8(tot) + reduce8(bias);
    }
}

__attribute__((target("avx2,fma"))) static inline __attribute__((always_inline)) void tile_any(const uint8_t *w, const float *s,
                                                                const float *b, size_t rows,
                                                                const Input *x, float *out, int two) {
    const __m256i low = _mm256_set1_epi8(15), ones = _mm256_set1_epi16(1), steps = _mm256_set1_epi16(254);
    const int32_t *q = (const int32_t *)x->q, *q2 = (const int32_t *)x->q2;
    for (size_t t = 0; t < rows / 8; t++) {
        const uint8_t *wp = w + t * 8 * CH * 32;
        __m256 acc = _mm256_setzero_ps(), bacc = _mm256_setzero_ps();
        for (int c = 0; c < CH; c++) {
            for (int h = 0; h < 2; h++) {
                __m256i a1 = _mm256_setzero_si256(), a2 = _mm256_setzero_si256();
                for (int k = 4 * h; k < 4 * h + 4; k++) {
                    const uint8_t *p = wp + c * 256 + k * 32;
                    _mm_prefetch((const char *)p + PF, _MM_HINT_T0);
                    __m256i v = _mm256_loadu_si256((const __m256i *)p);
                    __m256i lo = _mm256_and_si256(v, low), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    int e = (c * 64 + 4 * k) / 4, o = (c * 64 + 32 + 4 * k) / 4;
                    a1 = _mm256_add_epi16(a1, _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(q[e])),
                                                               _mm256_maddubs_epi16(hi, _mm256_set1_epi32(q[o]))));
                    if (two)
                        a2 = _mm256_add_epi16(a2, _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_set1_epi32(q2[e])),
                                                                   _mm256_maddubs_epi16(hi, _mm256_set1_epi32(q2[o]))));
                }
                __m256i sum = two ? _mm256_add_epi32(_mm256_madd_epi16(a1, steps), _mm256_madd_epi16(a2, ones))
                                  : _mm256_madd_epi16(a1, ones);
                __m256 sv = _mm256_loadu_ps(s + (t * CH + c) * 8);
                acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sv, _mm256_set1_ps(x->dblk[c * 2 + h])), acc);
            }
            bacc = _mm256_fmadd_ps(_mm256_loadu_ps(b + (t * CH + c) * 8), _mm256_set1_ps(x->xsum[c]), bacc);
        }
        _mm256_storeu_ps(out + t * 8, _mm256_add_ps(acc, bacc));
    }
}

__attribute__((target("avx2,fma"))) static void rows2(const uint8_t *w, const float *s, const float *b, size_t n, const Input *x, float *o) { rows_any(w, s, b, n, x, o, 1); }
__attribute__((target("avx2,fma"))) static void rows1(const uint8_t *w, const float *s, const float *b, size_t n, const Input *x, float *o) { rows_any(w, s, b, n, x, o, 0); }
__attribute__((target("avx2,fma"))) static void tile2(const uint8_t *w, const float *s, const float *b, size_t n, const Input *x, float *o) { tile_any(w, s, b, n, x, o, 1); }
__attribute__((target("avx2,fma"))) static void tile1(const uint8_t *w, const float *s, const float *b, size_t n, const Input *x, float *o) { tile_any(w, s, b, n, x, o, 0); }

int main(int argc, char **argv) {
    int rounds = argc > 1 ? atoi(argv[1]) : 3;
    const size_t sizes_mb[2] = {1, 300};
    Kernel ks[4] = {rows2, rows1, tile2, tile1};
    const char *names[4] = {"rows2", "rows1", "tile2", "tile1"};
    srand(1);
    Input x;
    for (int i = 0; i < COLS; i++) x.q[i] = (int8_t)(rand() % 255 - 127), x.q2[i] = (int8_t)(rand() % 255 - 127);
    for (int i = 0; i < CH * 8; i++) x.d[i] = 0.01f;
    for (int i = 0; i < COLS / 32; i++) x.dblk[i] = 0.01f;
    for (int i = 0; i < CH; i++) x.xsum[i] = 1.0f;
    printf("| working set | round | kernel | ns per row × 64 columns | ÷ rows2 (time) |\n|---|---|---|---|---|\n");
    for (int si = 0; si < 2; si++) {
        size_t rows = ((sizes_mb[si] << 20) / (COLS / 2)) / 8 * 8;
        uint8_t *w = aligned_alloc(64, rows * COLS / 2);
        float *s = malloc(rows * CH * sizeof(float)), *b = malloc(rows * CH * sizeof(float));
        float *out = malloc(rows * sizeof(float));
        for (size_t i = 0; i < rows * COLS / 2; i++) w[i] = (uint8_t)rand();
        for (size_t i = 0; i < rows * CH; i++) s[i] = 1e-3f * (rand() % 100), b[i] = 1e-3f * (rand() % 100);
        // About 1.2 GB of weights streamed per timing, whatever the working set.
        int reps = (int)((1200u << 20) / (rows * COLS / 2)) + 1;
        for (int r = 1; r <= rounds; r++) {
            double base = 0;
            for (int k = 0; k < 4; k++) {
                ks[k](w, s, b, rows, &x, out);  // warm
                double t0 = now();
                for (int i = 0; i < reps; i++) ks[k](w, s, b, rows, &x, out);
                double ns = (now() - t0) / reps / (rows * CH) * 1e9;
                if (k == 0) base = ns;
                printf("| %zu MB | %d | %s | %.2f | %.2f |\n", sizes_mb[si], r, names[k], ns, ns / base);
            }
        }
        free(w), free(s), free(b), free(out);
    }
    return 0;
}
