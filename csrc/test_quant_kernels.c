/* test_quant_kernels.c: the tiled quantized GEMMs against the plain reference loops, in C alone.
 *
 * Built with -fsanitize=address,undefined by tests/kernels/test_quant_kernels.py (and runnable by hand):
 *   cc -O1 -g -fsanitize=address -fopenmp -Icsrc csrc/test_quant_kernels.c csrc/quant_kernels.c \
 *      csrc/lora_kernels.c -o t && ./t
 * Every type, on sizes that are not multiples of the tiles or the SIMD width (M = 0, every M of the decode
 * path's 1 .. 8 and the tiled path's 9, ragged M, and above a block of 256 rows; N ragged, and odd with one
 * row of x past the one-thread threshold; K one block and several panels), a NULL bias, both element types,
 * 1 and 2 threads (results must be identical), the
 * dequantization of this CPU's build against the baseline's (equal values), and the error codes.
 * Prints the max difference per case; exits non-zero on a failure.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "quant.h"

static int failures = 0;
static unsigned long long rng_state = 88172645463325252ULL;

static unsigned long long next_bits(void) /* xorshift64 */
{
    rng_state ^= rng_state << 13, rng_state ^= rng_state >> 7, rng_state ^= rng_state << 17;
    return rng_state;
}

static double uniform(void) { return (double)(next_bits() >> 11) / 4503599627370496.0 - 1.0; } /* [-1, 1) */

/* A half in +-[2^-10, 2^-5): the scales and mins of the blocks, and the elements of F16. */
static void put_half(uint8_t *p)
{
    const unsigned bits = (unsigned)(next_bits() >> 20);
    const unsigned h = (bits & 0x8000u) | (unsigned)(5 + bits % 5) << 10 | (bits >> 4 & 0x3ffu);
    p[0] = (uint8_t)h, p[1] = (uint8_t)(h >> 8);
}

/* rows of random blocks of `type`: random quant bits, sane scales. */
static uint8_t *random_weight(int type, int64_t N, int64_t K)
{
    const int64_t rb = quant_row_bytes(type, K), bs = quant_block_size(type);
    const int64_t bb = rb / (K / bs), n_blocks = N * (K / bs);
    uint8_t *w = malloc((size_t)(N * rb > 0 ? N * rb : 1));
    for (int64_t i = 0; i < N * rb; i++) w[i] = (uint8_t)(next_bits() >> 32);
    for (int64_t i = 0; i < n_blocks; i++) {
        uint8_t *b = w + i * bb;
        switch (type) {
        case QUANT_F32: {
            const float f = (float)uniform();
            memcpy(b, &f, sizeof f);
            break;
        }
        case QUANT_F16: put_half(b); break;
        case QUANT_BF16: b[1] = (uint8_t)(0x3c | (b[1] & 0x80)); break; /* |x| in [2^-7, 2^-6) */
        case QUANT_Q6_K: put_half(b + 208); break;
        case QUANT_Q4_1: case QUANT_Q5_1: case QUANT_Q4_K: case QUANT_Q5_K: put_half(b + 2); /* fall through */
        default: put_half(b);
        }
    }
    return w;
}

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

static double *widen(const float *f, int64_t n)
{
    double *d = malloc(sizeof(double) * (size_t)(n > 0 ? n : 1));
    for (int64_t i = 0; i < n; i++) d[i] = f[i];
    return d;
}

/* max |a - b| over n elements, compared with tol * (1 + max |b|). */
static void expect_close(const char *what, const double *a, const double *b, int64_t n, double tol)
{
    double maxdiff = 0, maxabs = 0;
    for (int64_t i = 0; i < n; i++) {
        maxdiff = fmax(maxdiff, fabs(a[i] - b[i]));
        maxabs = fmax(maxabs, fabs(b[i]));
    }
    const int ok = maxdiff <= tol * (1 + maxabs);
    if (!ok) failures++;
    if (!ok || getenv("LORA_TEST_VERBOSE")) printf("%-44s maxdiff %.3e %s\n", what, maxdiff, ok ? "ok" : "FAIL");
}

static void expect(const char *what, int ok)
{
    if (!ok) {
        failures++;
        printf("%-44s FAIL\n", what);
    }
}

static void check_case(int type, int64_t M, int64_t N, int64_t K, int with_bias)
{
    char name[128];
    uint8_t *w = random_weight(type, N, K);
    double *x = random_array(M * K), *dy = random_array(M * N), *bias = random_array(N);
    float *xf = to_f32(x, M * K), *dyf = to_f32(dy, M * N), *biasf = to_f32(bias, N);
    double *y[3], *dx[3];
    float *yf[3], *dxf[3];
    for (int v = 0; v < 3; v++) { /* v = 0: reference, 1: tiled on 1 thread, 2: tiled on 2 threads */
        y[v] = malloc(sizeof(double) * (size_t)(M * N + 1)), dx[v] = malloc(sizeof(double) * (size_t)(M * K + 1));
        yf[v] = malloc(sizeof(float) * (size_t)(M * N + 1)), dxf[v] = malloc(sizeof(float) * (size_t)(M * K + 1));
        int rc = 0;
        lora_set_num_threads(v == 2 ? 2 : 1);
        if (v == 0) {
            rc |= quant_linear_forward_ref_f64(y[v], x, w, with_bias ? bias : NULL, type, M, N, K);
            rc |= quant_linear_backward_ref_f64(dx[v], dy, w, type, M, N, K);
            rc |= quant_linear_forward_ref_f32(yf[v], xf, w, with_bias ? biasf : NULL, type, M, N, K);
            rc |= quant_linear_backward_ref_f32(dxf[v], dyf, w, type, M, N, K);
        } else {
            rc |= quant_linear_forward_f64(y[v], x, w, with_bias ? bias : NULL, type, M, N, K);
            rc |= quant_linear_backward_f64(dx[v], dy, w, type, M, N, K);
            rc |= quant_linear_forward_f32(yf[v], xf, w, with_bias ? biasf : NULL, type, M, N, K);
            rc |= quant_linear_backward_f32(dxf[v], dyf, w, type, M, N, K);
        }
        snprintf(name, sizeof name, "type %d M=%lld N=%lld K=%lld v%d status", type, (long long)M, (long long)N,
                 (long long)K, v);
        expect(name, rc == LORA_OK);
    }
    lora_set_num_threads(0);
    for (int v = 1; v < 3; v++) {
        double *ywf = widen(yf[v], M * N), *yrf = widen(yf[0], M * N);
        double *dxwf = widen(dxf[v], M * K), *dxrf = widen(dxf[0], M * K);
        snprintf(name, sizeof name, "type %2d %lldx%lldx%lld bias %d v%d f64 y", type, (long long)M, (long long)N,
                 (long long)K, with_bias, v);
        expect_close(name, y[v], y[0], M * N, 1e-12);
        name[strlen(name) - 1] = 0, strcat(name, "dx");
        expect_close(name, dx[v], dx[0], M * K, 1e-12);
        snprintf(name, sizeof name, "type %2d %lldx%lldx%lld bias %d v%d f32 y", type, (long long)M, (long long)N,
                 (long long)K, with_bias, v);
        expect_close(name, ywf, yrf, M * N, 1e-5);
        name[strlen(name) - 1] = 0, strcat(name, "dx");
        expect_close(name, dxwf, dxrf, M * K, 1e-5);
        free(ywf), free(yrf), free(dxwf), free(dxrf);
    }
    snprintf(name, sizeof name, "type %d M=%lld 1 and 2 threads identical", type, (long long)M);
    expect(name, memcmp(y[1], y[2], sizeof(double) * (size_t)(M * N)) == 0 &&
                     memcmp(dx[1], dx[2], sizeof(double) * (size_t)(M * K)) == 0 &&
                     memcmp(yf[1], yf[2], sizeof(float) * (size_t)(M * N)) == 0 &&
                     memcmp(dxf[1], dxf[2], sizeof(float) * (size_t)(M * K)) == 0);
    for (int v = 0; v < 3; v++) free(y[v]), free(dx[v]), free(yf[v]), free(dxf[v]);
    free(w), free(x), free(dy), free(bias), free(xf), free(dyf), free(biasf);
}

/* This CPU's dequantization (quant_dequantize) against the reference loop's (forward_ref with x = I). */
static void check_dequantize(int type, int64_t N, int64_t K)
{
    char name[96];
    uint8_t *w = random_weight(type, N, K);
    float *out = malloc(sizeof(float) * (size_t)(N * K)), *eye = calloc((size_t)(K * K), sizeof(float));
    float *wt = malloc(sizeof(float) * (size_t)(K * N)); /* [K, N] = I @ W^T */
    for (int64_t k = 0; k < K; k++) eye[k * K + k] = 1;
    int rc = quant_dequantize_f32(out, w, type, N, K) | quant_linear_forward_ref_f32(wt, eye, w, NULL, type, K, N, K);
    int same = rc == LORA_OK;
    for (int64_t n = 0; n < N && same; n++)
        for (int64_t k = 0; k < K; k++) same &= out[n * K + k] == wt[k * N + n]; /* +0 and -0 alike */
    snprintf(name, sizeof name, "type %d dequantize equals the baseline's", type);
    expect(name, same);
    /* a column panel read in place (quant_dequantize_cols): the same values as those columns of the rows */
    const int64_t bs = quant_block_size(type), k0 = K / bs / 3 * bs, n = K / bs / 2 * bs;
    float *cols = malloc(sizeof(float) * (size_t)(N * n + 1));
    double *cols64 = malloc(sizeof(double) * (size_t)(N * n + 1));
    rc = quant_dequantize_cols_f32(cols, w, type, N, K, k0, n) | quant_dequantize_cols_f64(cols64, w, type, N, K, k0, n);
    same = rc == LORA_OK;
    for (int64_t r = 0; r < N && same; r++)
        for (int64_t k = 0; k < n; k++)
            same &= cols[r * n + k] == out[r * K + k0 + k] && cols64[r * n + k] == (double)out[r * K + k0 + k];
    snprintf(name, sizeof name, "type %d column panel [%lld, %lld) equals those columns", type, (long long)k0,
             (long long)(k0 + n));
    expect(name, same);
    if (bs > 1) {
        snprintf(name, sizeof name, "type %d column panel off the blocks refused", type);
        expect(name, quant_dequantize_cols_f32(cols, w, type, N, K, k0 + 1, bs) == LORA_EINVAL &&
                         quant_dequantize_cols_f32(cols, w, type, N, K, 0, bs + 1) == LORA_EINVAL);
    }
    snprintf(name, sizeof name, "type %d column panel past K refused", type);
    expect(name, quant_dequantize_cols_f32(cols, w, type, N, K, K - bs + bs, bs) == LORA_EINVAL &&
                     quant_dequantize_cols_f32(cols, w, type, N, K, -bs, bs) == LORA_EINVAL);
    free(w), free(out), free(eye), free(wt), free(cols), free(cols64);
}

static void check_errors(void)
{
    float y[64], x[64] = {0};
    uint8_t w[64] = {0};
    expect("unknown type", quant_linear_forward_f32(y, x, w, NULL, 9, 1, 1, 32) == LORA_EINVAL);
    expect("K not whole blocks", quant_linear_forward_f32(y, x, w, NULL, QUANT_Q4_0, 1, 1, 16) == LORA_EINVAL);
    expect("negative M", quant_linear_backward_f32(y, x, w, QUANT_Q8_0, -1, 1, 32) == LORA_EINVAL);
    expect("NULL x", quant_linear_forward_f32(y, NULL, w, NULL, QUANT_Q8_0, 1, 1, 32) == LORA_EINVAL);
    expect("NULL weight", quant_dequantize_f32(y, NULL, QUANT_Q8_0, 1, 32) == LORA_EINVAL);
    expect("row bytes Q4_K", quant_row_bytes(QUANT_Q4_K, 512) == 288 && quant_row_bytes(QUANT_Q4_K, 100) == 0);
}

int main(void)
{
    static const int types[] = {QUANT_F32, QUANT_F16,  QUANT_BF16, QUANT_Q4_0, QUANT_Q4_1, QUANT_Q5_0,
                                QUANT_Q5_1, QUANT_Q8_0, QUANT_Q4_K, QUANT_Q5_K, QUANT_Q6_K};
    static const int64_t Ms[] = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 70};
    for (size_t t = 0; t < sizeof types / sizeof *types; t++) {
        const int type = types[t];
        const int64_t bs = quant_block_size(type), K1 = bs == 1 ? 37 : bs, K2 = bs == 256 ? 768 : 288;
        check_dequantize(type, 5, K2);
        for (size_t m = 0; m < sizeof Ms / sizeof *Ms; m++) {
            check_case(type, Ms[m], 70, K2, 1);
            check_case(type, Ms[m], 3, K1, m % 2);
        }
        check_case(type, 1, 701, K2, 1); /* 1 x 701 x K2 > PARALLEL_WORK: the decode path on 2 threads */
    }
    check_case(QUANT_Q4_K, 261, 70, 768, 1); /* more than one block of MBLK = 256 rows */
    check_case(QUANT_Q8_0, 261, 3, 32, 0);
    check_errors();
    if (failures) {
        printf("%d failures\n", failures);
        return 1;
    }
    printf("all quantized GEMM checks passed\n");
    return 0;
}
