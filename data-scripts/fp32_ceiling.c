// The fp32 ceilings of this CPU's AVX2 cores, for the roofline argument in
// the README (CaiT-M48's tenth of the reference): an FMA-only loop (the
// peak) and the classic 6x16 AVX2 matrix-product micro-kernel (12 ymm
// accumulators, per reduction step 2 weight loads and 6 broadcasts) with
// both operands in L1, one copy per thread, no other memory traffic.
//
//   gcc -O3 -funroll-loops -mavx2 -mfma -fopenmp data-scripts/fp32_ceiling.c -o /tmp/fp32_ceiling
//   OMP_NUM_THREADS=2 /tmp/fp32_ceiling
//
// Prints GFLOP/s summed over the threads, best of 3 runs each.
#include <immintrin.h>
#include <omp.h>
#include <stdio.h>
#include <stdlib.h>

#define K 256

static double fma_peak(void) {
    const long iters = 200000000;
    double t0 = omp_get_wtime();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        // 10 independent chains cover the FMA latency on both pipes.
        __m256 a[10];
        for (int i = 0; i < 10; i++) a[i] = _mm256_set1_ps(1.0f);
        const __m256 b = _mm256_set1_ps(0.999999f), c = _mm256_set1_ps(1e-7f);
        for (long it = 0; it < iters; it++) {
#pragma GCC unroll 10
            for (int i = 0; i < 10; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
        }
        __m256 s = a[0];
        for (int i = 1; i < 10; i++) s = _mm256_add_ps(s, a[i]);
        float t[8];
        _mm256_storeu_ps(t, s);
        sink += t[0];
    }
    double dt = omp_get_wtime() - t0;
    if (sink == 42.0f) puts("");  // keep the result live
    return (double)iters * 10 * 8 * 2 * omp_get_max_threads() / dt / 1e9;
}

static double micro_6x16(void) {
    const long reps = 400000;
    double t0 = omp_get_wtime();
    float sink = 0;
#pragma omp parallel reduction(+ : sink)
    {
        float *a0 = aligned_alloc(64, K * 6 * sizeof(float));
        float *b0 = aligned_alloc(64, K * 16 * sizeof(float));
        for (int i = 0; i < K * 6; i++) a0[i] = 1e-3f;
        for (int i = 0; i < K * 16; i++) b0[i] = 1e-3f;
        for (long r = 0; r < reps; r++) {
            __m256 c[12];
            for (int i = 0; i < 12; i++) c[i] = _mm256_setzero_ps();
            const float *a = a0, *b = b0;
            for (int k = 0; k < K; k++) {
                __m256 w0 = _mm256_load_ps(b), w1 = _mm256_load_ps(b + 8);
#pragma GCC unroll 6
                for (int i = 0; i < 6; i++) {
                    __m256 x = _mm256_broadcast_ss(a + i);
                    c[2 * i] = _mm256_fmadd_ps(x, w0, c[2 * i]);
                    c[2 * i + 1] = _mm256_fmadd_ps(x, w1, c[2 * i + 1]);
                }
                a += 6;
                b += 16;
            }
            __m256 s = c[0];
            for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, c[i]);
            float t[8];
            _mm256_storeu_ps(t, s);
            sink += t[0];
        }
        free(a0);
        free(b0);
    }
    double dt = omp_get_wtime() - t0;
    if (sink == 42.0f) puts("");
    return (double)reps * K * 12 * 8 * 2 * omp_get_max_threads() / dt / 1e9;
}

int main(void) {
    double peak = 0, micro = 0;
    for (int r = 0; r < 3; r++) {
        double p = fma_peak(), m = micro_6x16();
        if (p > peak) peak = p;
        if (m > micro) micro = m;
    }
    printf("%d threads: FMA-only peak %.1f GFLOP/s, 6x16 micro-kernel in L1 %.1f GFLOP/s (%.0f%%)\n",
           omp_get_max_threads(), peak, micro, 100 * micro / peak);
    return 0;
}
