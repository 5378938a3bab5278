// The read bandwidth bound of a CPU engine's decode step on this machine: T threads each sum
// their slice of a 2 GiB buffer with 64-byte loads (more than any last-level cache here), best
// of 5 passes, for T = 1 2 4 8 16; prints a markdown table of GB/s.
// Build and run: gcc -O2 -pthread -o /tmp/mem_bw scripts/peers/mem_bw.c && /tmp/mem_bw
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define BYTES (2ull << 30)
static char *buf;
static int nth;
static volatile long long sink;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2"))) static void *work(void *arg) {
    size_t per = BYTES / nth;
    const char *p = buf + (size_t)arg * per;
    __m256i a = _mm256_setzero_si256(), b = _mm256_setzero_si256();
    for (size_t k = 0; k < per; k += 64) {
        a = _mm256_add_epi64(a, _mm256_load_si256((const __m256i *)(p + k)));
        b = _mm256_add_epi64(b, _mm256_load_si256((const __m256i *)(p + k + 32)));
    }
    sink += _mm256_extract_epi64(_mm256_add_epi64(a, b), 0);
    return 0;
}

int main(void) {
    if (!__builtin_cpu_supports("avx2")) {
        fprintf(stderr, "mem_bw: this CPU has no AVX2\n");
        return 1;
    }
    buf = aligned_alloc(64, BYTES);
    if (!buf) return 1;
    memset(buf, 1, BYTES);
    printf("| threads | read GB/s |\n|---|---|\n");
    const int ts[] = {1, 2, 4, 8, 16};
    for (int j = 0; j < 5; j++) {
        nth = ts[j];
        double best = 1e9;
        for (int r = 0; r < 5; r++) {
            pthread_t th[16];
            double t0 = now();
            for (long i = 0; i < nth; i++) pthread_create(&th[i], 0, work, (void *)i);
            for (int i = 0; i < nth; i++) pthread_join(th[i], 0);
            double t = now() - t0;
            if (t < best) best = t;
        }
        printf("| %d | %.1f |\n", nth, BYTES / best / 1e9);
    }
    return 0;
}
