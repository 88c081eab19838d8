/* test_lora_kernels.c: the tiled kernels against the plain reference loops, in C alone.
 *
 * Built with -fsanitize=address by tests/test_kernels.py (and runnable by hand):
 *   cc -O1 -g -fsanitize=address -fopenmp -Icsrc csrc/test_lora_kernels.c csrc/lora_kernels.c -o t && ./t
 * Covers sizes that are not multiples of the SIMD width or the tiles, N = 0 and 1, NULL
 * outputs, both element types, fan_in_fan_out, 1 and 2 threads (results must be identical),
 * and the error codes. Prints the max difference per tensor; exits non-zero on a failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_np.h"

static int failures = 0;
static unsigned long long rng_state = 88172645463325252ULL;

static double uniform(void) /* xorshift64, in [-1, 1) */
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 4503599627370496.0 - 1.0;
}

/* Each case allocates exactly the sizes it needs, so ASan sees any read or write past them. */
static double *random_array(int64_t n)
{
    double *a = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) a[i] = uniform();
    return a;
}

static float *to_f32(const double *a, int64_t n)
{
    float *f = malloc(sizeof(float) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) f[i] = (float)a[i];
    return f;
}

/* max |a - b| over n elements, compared with tol * (1 + max |b|). */
static void expect_close(const char *what, const double *a, const double *b, int64_t n, double tol)
{
    double maxdiff = 0, maxabs = 0;
    for (int64_t i = 0; i < n; i++) {
        maxdiff = fmax(maxdiff, fabs(a[i] - b[i]));
        maxabs = fmax(maxabs, fabs(b[i]));
    }
    int ok = maxdiff <= tol * (1 + maxabs);
    if (!ok) failures++;
    if (!ok || getenv("LORA_TEST_VERBOSE")) printf("%-34s maxdiff %.3e %s\n", what, maxdiff, ok ? "ok" : "FAIL");
}

static void expect_equal(const char *what, const void *a, const void *b, size_t bytes)
{
    if (memcmp(a, b, bytes) != 0) {
        failures++;
        printf("%-34s differs between 1 and 2 threads FAIL\n", what);
    }
}

static double *widen(const float *f, int64_t n)
{
    double *d = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) d[i] = f[i];
    return d;
}

static void check_f64(int64_t N, int64_t in, int64_t out, int64_t r, double s)
{
    char name[96];
    double *x = random_array(N * in), *A = random_array(r * in), *B = random_array(out * r);
    double *dy = random_array(N * out), *W = random_array(out * in);
    double *y0 = random_array(N * out), *dx0 = random_array(N * in), *dA0 = random_array(r * in), *dB0 = random_array(out * r);
    double *y[3], *t[3], *dx[3], *dA[3], *dB[3], *Wm[3];
    for (int v = 0; v < 3; v++) { /* v = 0: reference, 1: tiled on 1 thread, 2: tiled on 2 threads */
        y[v] = malloc(sizeof(double) * (size_t)(N * out + 1)), memcpy(y[v], y0, sizeof(double) * (size_t)(N * out));
        t[v] = malloc(sizeof(double) * (size_t)(N * r + 1));
        dx[v] = malloc(sizeof(double) * (size_t)(N * in + 1)), memcpy(dx[v], dx0, sizeof(double) * (size_t)(N * in));
        dA[v] = malloc(sizeof(double) * (size_t)(r * in + 1)), memcpy(dA[v], dA0, sizeof(double) * (size_t)(r * in));
        dB[v] = malloc(sizeof(double) * (size_t)(out * r + 1)), memcpy(dB[v], dB0, sizeof(double) * (size_t)(out * r));
        Wm[v] = malloc(sizeof(double) * (size_t)(out * in + 1)), memcpy(Wm[v], W, sizeof(double) * (size_t)(out * in));
        int fifo = (int)(N % 2); /* alternate the two weight layouts */
        if (v == 0) {
            lora_forward_ref_f64(y[v], t[v], x, A, B, s, N, in, out, r);
            lora_backward_ref_f64(dx[v], dA[v], dB[v], dy, x, t[v], A, B, s, N, in, out, r);
            lora_merge_ref_f64(Wm[v], A, B, s, fifo, in, out, r);
        } else {
            lora_set_num_threads(v);
            lora_forward_f64(y[v], t[v], x, A, B, s, N, in, out, r);
            lora_backward_f64(dx[v], dA[v], dB[v], dy, x, t[v], A, B, s, N, in, out, r);
            lora_merge_f64(Wm[v], A, B, s, fifo, in, out, r);
        }
    }
    snprintf(name, sizeof name, "f64 N=%lld in=%lld out=%lld r=%lld", (long long)N, (long long)in, (long long)out, (long long)r);
    const char *tensors[] = {"y", "t", "dx", "d_lora_A", "d_lora_B", "merged"};
    double **all[] = {y, t, dx, dA, dB, Wm};
    int64_t sizes[] = {N * out, N * r, N * in, r * in, out * r, out * in};
    for (int k = 0; k < 6; k++) {
        char what[128];
        snprintf(what, sizeof what, "%s %s", name, tensors[k]);
        expect_close(what, all[k][1], all[k][0], sizes[k], 1e-12);
        expect_equal(what, all[k][1], all[k][2], sizeof(double) * (size_t)sizes[k]);
    }
    /* NULL outputs: each gradient alone equals its value computed with the others. */
    double *only = malloc(sizeof(double) * (size_t)(r * in + 1));
    memcpy(only, dA0, sizeof(double) * (size_t)(r * in));
    lora_backward_f64(NULL, only, NULL, dy, x, t[1], A, B, s, N, in, out, r);
    snprintf(name, sizeof name, "f64 d_lora_A alone N=%lld", (long long)N);
    expect_equal(name, only, dA[1], sizeof(double) * (size_t)(r * in));
    free(only);
    for (int v = 0; v < 3; v++) free(y[v]), free(t[v]), free(dx[v]), free(dA[v]), free(dB[v]), free(Wm[v]);
    free(x), free(A), free(B), free(dy), free(W), free(y0), free(dx0), free(dA0), free(dB0);
}

static void check_f32(int64_t N, int64_t in, int64_t out, int64_t r, double s)
{
    double *x = random_array(N * in), *A = random_array(r * in), *B = random_array(out * r);
    float *xf = to_f32(x, N * in), *Af = to_f32(A, r * in), *Bf = to_f32(B, out * r);
    float *y = calloc((size_t)(N * out + 1), sizeof(float)), *t = malloc(sizeof(float) * (size_t)(N * r + 1));
    float *yr = calloc((size_t)(N * out + 1), sizeof(float)), *tr = malloc(sizeof(float) * (size_t)(N * r + 1));
    float *dA = calloc((size_t)(r * in + 1), sizeof(float)), *dAr = calloc((size_t)(r * in + 1), sizeof(float));
    float *W = calloc((size_t)(out * in + 1), sizeof(float)), *Wr = calloc((size_t)(out * in + 1), sizeof(float));
    lora_set_num_threads(2);
    lora_forward_f32(y, t, xf, Af, Bf, s, N, in, out, r);
    lora_forward_ref_f32(yr, tr, xf, Af, Bf, s, N, in, out, r);
    lora_backward_f32(NULL, dA, NULL, yr, xf, tr, Af, Bf, s, N, in, out, r);
    lora_backward_ref_f32(NULL, dAr, NULL, yr, xf, tr, Af, Bf, s, N, in, out, r);
    lora_merge_f32(W, Af, Bf, s, 1, in, out, r);
    lora_merge_ref_f32(Wr, Af, Bf, s, 1, in, out, r);
    double *a[] = {widen(y, N * out), widen(dA, r * in), widen(W, out * in)};
    double *b[] = {widen(yr, N * out), widen(dAr, r * in), widen(Wr, out * in)};
    int64_t sizes[] = {N * out, r * in, out * in};
    const char *what[] = {"f32 y", "f32 d_lora_A", "f32 merged (fan_in_fan_out)"};
    for (int k = 0; k < 3; k++) {
        expect_close(what[k], a[k], b[k], sizes[k], 1e-5);
        free(a[k]), free(b[k]);
    }
    free(x), free(A), free(B), free(xf), free(Af), free(Bf), free(y), free(t), free(yr), free(tr);
    free(dA), free(dAr), free(W), free(Wr);
}

int main(void)
{
    /* N, in, out, r: empty (N, r, in or out = 0), a single token, odd sizes around the SIMD
     * width (4 / 8) and the tiles (3 and 6 rows, 4, 8 and 16 ranks, 32 token rows, 256-token chunks),
     * wide rows (backward blocks of 3 rows) and rank 64 (column panels of the partial sums). */
    static const int64_t cases[][4] = {
        {0, 5, 7, 3},   {1, 1, 1, 1},     {1, 17, 9, 5},   {2, 8, 16, 4},   {3, 33, 31, 9},
        {5, 16, 17, 8}, {33, 20, 12, 12}, {65, 9, 40, 17}, {130, 24, 7, 2}, {200, 12, 33, 64},
        {600, 9, 20, 5}, {777, 3, 5, 1},   {4, 6, 5, 0},     {4, 0, 5, 3},    {4, 6, 0, 3},
        {70, 40, 35, 16}, {40, 3000, 5000, 8}, {31, 3000, 5000, 1}, {50, 300, 700, 64},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        check_f64(cases[c][0], cases[c][1], cases[c][2], cases[c][3], 0.75);
        check_f32(cases[c][0], cases[c][1], cases[c][2], cases[c][3], -1.5);
    }
    /* Bad sizes are reported, not acted on. */
    float one = 0;
    if (lora_forward_f32(&one, &one, &one, &one, &one, 1.0, -1, 1, 1, 1) != LORA_EINVAL) failures++;
    if (lora_backward_f64(NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 1.0, 1, 1, 1, 1) != LORA_EINVAL) failures++;
    if (lora_merge_f32(&one, &one, &one, 1.0, 0, 1, -2, 1) != LORA_EINVAL) failures++;
    printf("%s (%d failures)\n", failures ? "FAILED" : "all C kernel checks passed", failures);
    return failures != 0;
}
