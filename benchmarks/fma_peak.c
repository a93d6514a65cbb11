/* The fp32 FMA throughput of one core, measured: the ceiling behind "of fp32 peak" in bench.py.
 *
 *   cc -O2 -o /tmp/fma_peak benchmarks/fma_peak.c && /tmp/fma_peak
 *
 * Twelve independent chains of fused multiply-adds (enough to hide the FMA latency on every x86
 * core we know), 256-bit (AVX2 + FMA) and, where the CPU has it, 512-bit (AVX-512F). The ratio of
 * the two says whether the core has 512-bit FMA units (2.0) or splits 512-bit operations over
 * 256-bit ones (1.0); GFLOP/s divided by FLOP per cycle gives the clock the core really ran at,
 * turbo included. Run one copy per core at once to see the all-core figure. */
#include <immintrin.h>
#include <stdio.h>
#include <time.h>

#define CHAINS 12

static double seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

__attribute__((target("avx2,fma"))) static float chains256(long rounds) {
    __m256 acc[CHAINS], mul = _mm256_set1_ps(1.0000001f), add = _mm256_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_set1_ps((float)i);
    for (long r = 0; r < rounds; r++) {
#pragma GCC unroll 12 /* the chains must live in registers, not in the array */
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm256_fmadd_ps(acc[i], mul, add);
    }
    float out[8], sum = 0;
    for (int i = 0; i < CHAINS; i++) {
        _mm256_storeu_ps(out, acc[i]);
        sum += out[0];
    }
    return sum;  /* used, so the loop is not optimised away */
}

__attribute__((target("avx512f"))) static float chains512(long rounds) {
    __m512 acc[CHAINS], mul = _mm512_set1_ps(1.0000001f), add = _mm512_set1_ps(1e-7f);
    for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_set1_ps((float)i);
    for (long r = 0; r < rounds; r++) {
#pragma GCC unroll 12
        for (int i = 0; i < CHAINS; i++) acc[i] = _mm512_fmadd_ps(acc[i], mul, add);
    }
    float sum = 0;
    for (int i = 0; i < CHAINS; i++) sum += _mm512_reduce_add_ps(acc[i]);
    return sum;
}

int main(void) {
    const long rounds = 200000000L;
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) {
        printf("no AVX2 + FMA on this CPU\n");
        return 1;
    }
    for (int run = 0; run < 3; run++) {
        double t = seconds();
        float check = chains256(rounds);
        double g256 = rounds * CHAINS * 8.0 * 2 / (seconds() - t) / 1e9;
        printf("run %d: 256-bit FMA %6.1f GFLOP/s (%.2f GHz at 32 FLOP/cycle)", run + 1, g256, g256 / 32);
        if (__builtin_cpu_supports("avx512f")) {
            t = seconds();
            check += chains512(rounds);
            double g512 = rounds * CHAINS * 16.0 * 2 / (seconds() - t) / 1e9;
            printf("; 512-bit FMA %6.1f GFLOP/s, %.2fx the 256-bit rate", g512, g512 / g256);
        }
        printf(" [%g]\n", (double)check);
    }
    return 0;
}
