/* test_step_kernels.c: the fused step kernels (step_kernels.c) against plain scalar loops, in C alone.
 *
 * Built with -fsanitize=address by tests/test_step_kernels.py (and runnable by hand):
 *   cc -O1 -g -fsanitize=address -fopenmp -Icsrc csrc/test_step_kernels.c csrc/step_kernels.c \
 *      csrc/lora_kernels.c -o t -lm && ./t
 * (step_kernels.c calls lora_np_use_v3 and lora_get_num_threads from lora_kernels.c.)
 * Every buffer is malloc'ed with exactly the bytes it holds (one byte for an empty one), so ASan
 * sees any read or write past an end: sizes n = 0, 1, 7, 9, 33, 257, ... around the SIMD widths
 * (4 and 8 floats, 2 and 4 doubles) and the padded tails. The references below use libm's exp
 * in double. Tolerance: float64 1e-12, float32 1e-5, relative to the magnitude of the terms plus,
 * for float32, a floor for the vector exp that returns 0 below FLT_MIN where libm gives a
 * denormal. Also: 1 and 2 threads give identical bits on sizes that go parallel, and NULL
 * pointers or bad sizes return LORA_EINVAL without touching anything. Exits non-zero on a failure.
 * attention_forward / attention_backward: against a scalar reference of the definition (grouped-query
 * heads, bottom-right causal mask, rows that see no key), with q, out, dq, dout in four layouts
 * (dense, the (B, T, Hq, D) transpose, padded rows, a negative position stride), every subset of
 * NULL gradient outputs (bit for bit the values of the full call), outputs that start as NaN (so that
 * one not written shows), T = 1, S = 1, T != S both ways, S, T or B = 0, D = 1, 17, 65; 1 and 2
 * threads bit for bit; LORA_EINVAL for bad sizes or NULL pointers, nothing written.
 * rms_norm_forward / rms_norm_backward: rows 0, 1, 37 of n = 1, 7, 9, 33, 577, with and without weight,
 * eps 0 to 0.25, magnitudes 1e+-12 (float) and 1e+-140 (double); gx alone and gweight alone (NULL for
 * the other) bit for bit the full call's, gweight accumulated onto its start. rotary, forward and
 * transpose: D = 2, 6, 64, 130 (and 0), B, H, T = 0 to 37, random tables whose halves differ, x and out in
 * the layouts above (dense, the (B, T, H, D) transpose, padded rows, reversed positions) passed with their
 * strides. Both: 1 and 2 threads bit for bit, LORA_EINVAL for bad sizes, odd D, NULL inputs.
 */
#include <float.h>
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

/* Exactly `bytes` bytes (one for an empty array, so that malloc(0) never gives NULL). */
static void *alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    if (!p) {
        printf("out of memory\n");
        exit(2);
    }
    return p;
}

static void fail(const char *what)
{
    failures++;
    printf("%s FAIL\n", what);
}

/* got vs want element by element: non-finite values must match exactly (NaN where NaN), finite
 * ones within tol[i]. */
static void expect_close(const char *what, const double *got, const double *want, const double *tol, int64_t n)
{
    double worst = 0;
    int64_t bad = -1;
    for (int64_t i = 0; i < n; i++) {
        int ok;
        if (isnan(want[i]) || isnan(got[i])) ok = isnan(want[i]) && isnan(got[i]);
        else if (isinf(want[i]) || isinf(got[i])) ok = got[i] == want[i];
        else ok = fabs(got[i] - want[i]) <= tol[i];
        if (!ok && bad < 0) bad = i;
        if (isfinite(got[i]) && isfinite(want[i])) worst = fmax(worst, fabs(got[i] - want[i]) / fmax(tol[i], 1e-300));
    }
    if (bad >= 0) {
        failures++;
        printf("%-44s FAIL at %lld: got %.9g want %.9g tol %.3g\n", what, (long long)bad, got[bad], want[bad], tol[bad]);
    } else if (getenv("LORA_TEST_VERBOSE")) {
        printf("%-44s ok (worst %.2f of the tolerance)\n", what, worst);
    }
}

static void expect_equal(const char *what, const void *a, const void *b, size_t bytes)
{
    if (memcmp(a, b, bytes) != 0) {
        failures++;
        printf("%-44s differs between 1 and 2 threads FAIL\n", what);
    }
}

/* ---- scalar references, in double ----------------------------------------------------------- */

static double sigmoid(double a) { return 1.0 / (1.0 + exp(-a)); }

static int64_t vis_of(int64_t i, int64_t n, int64_t period, int64_t count0, int64_t group)
{
    int64_t v = count0 + (i % period) / group;
    return v < 0 ? 0 : v > n ? n : v;
}

/* One row of softmax_rows: p [n] in, out [n], *lse, and *m the row's max (for the tolerance). With
 * f32, p - max is rounded to float before exp, as the float32 kernel (and NumPy) do: that rounding
 * alone is up to |p - max| * 2^-24 relative, 1.2e-5 at a distance of 200. */
static double shifted(double x, int f32) { return f32 ? (double)(float)x : x; }

static void softmax_ref(double *out, double *lse, double *m, const double *p, double scale, int64_t vis, int64_t n,
                        int f32)
{
    double mx = -INFINITY, sum = 0;
    for (int64_t j = 0; j < vis; j++) mx = p[j] > mx ? p[j] : mx;
    *m = mx;
    for (int64_t j = 0; j < n; j++) out[j] = 0;
    if (vis == 0 || mx == -INFINITY) {
        *lse = INFINITY;
        return;
    }
    for (int64_t j = 0; j < vis; j++) sum += exp(shifted(p[j] - mx, f32));
    for (int64_t j = 0; j < vis; j++) out[j] = scale * exp(shifted(p[j] - mx, f32)) / sum;
    *lse = mx + log(sum);
}

/* ---- one element type at a time ---------------------------------------------------------------
 * The checks are written once over `real` and instantiated for float and double below. */

#define CHECKS(real, SFX, RTOL, FLOOR)                                                                             \
    static real *random_##SFX(int64_t n, double mag)                                                               \
    {                                                                                                              \
        real *a = alloc(sizeof(real) * (size_t)n);                                                                 \
        for (int64_t i = 0; i < n; i++) a[i] = (real)(mag * uniform());                                            \
        return a;                                                                                                  \
    }                                                                                                              \
    static double *widen_##SFX(const real *a, int64_t n)                                                           \
    {                                                                                                              \
        double *d = alloc(sizeof(double) * (size_t)n);                                                             \
        for (int64_t i = 0; i < n; i++) d[i] = a[i];                                                               \
        return d;                                                                                                  \
    }                                                                                                              \
    /* a (n elements) widened, against want within tol, reported as "<name> <label>" */                            \
    static void expect_close_##SFX(const char *name, const char *label, const real *a, const double *want,         \
                                   const double *tol, int64_t n)                                                   \
    {                                                                                                              \
        char what[200];                                                                                            \
        double *got = widen_##SFX(a, n);                                                                           \
        snprintf(what, sizeof what, "%s %s", name, label);                                                         \
        expect_close(what, got, want, tol, n);                                                                     \
        free(got);                                                                                                 \
    }                                                                                                              \
                                                                                                                   \
    /* silu_mul_forward / _backward on n elements; the sigmoid may differ by ds = RTOL * s + FLOOR. */             \
    static void check_silu_##SFX(int64_t n, double mag)                                                            \
    {                                                                                                              \
        char what[128];                                                                                            \
        real *a = random_##SFX(n, mag), *b = random_##SFX(n, 3), *g = random_##SFX(n, 3);                          \
        real *out = alloc(sizeof(real) * (size_t)n), *ga = alloc(sizeof(real) * (size_t)n);                        \
        real *gb = alloc(sizeof(real) * (size_t)n), *gb_only = alloc(sizeof(real) * (size_t)n);                    \
        double *want = alloc(sizeof(double) * (size_t)(3 * n)), *tol = alloc(sizeof(double) * (size_t)(3 * n));    \
        if (n > 2) a[0] = 0, a[1] = (real)-88.5, a[2] = (real)95; /* exp(-a) at 0, overflowing, underflowing */    \
        for (int64_t i = 0; i < n; i++) {                                                                          \
            double A = a[i], B = b[i], G = g[i], s = sigmoid(A), ds = RTOL * s + FLOOR;                            \
            want[i] = s * A * B;                                                                                   \
            tol[i] = RTOL * fabs(want[i]) + fabs(A * B) * ds;                                                      \
            want[n + i] = ((1 - s) * A + 1) * s * B * G;                                                           \
            tol[n + i] = RTOL * fabs(G * B) * s * (1 + fabs((1 - s) * A)) + fabs(G * B) * (1 + fabs(A)) * ds;      \
            want[2 * n + i] = s * A * G;                                                                           \
            tol[2 * n + i] = RTOL * fabs(want[2 * n + i]) + fabs(A * G) * ds;                                      \
        }                                                                                                          \
        int st = silu_mul_forward_##SFX(out, a, b, n);                                                             \
        st |= silu_mul_backward_##SFX(ga, gb, g, a, b, n);                                                         \
        st |= silu_mul_backward_##SFX(NULL, gb_only, g, a, NULL, n); /* b may be NULL without ga */                \
        st |= silu_mul_backward_##SFX(NULL, NULL, g, a, NULL, n);    /* nothing asked: nothing done */             \
        snprintf(what, sizeof what, #SFX " silu_mul n=%lld status", (long long)n);                                 \
        if (st != LORA_OK) fail(what);                                                                             \
        double *got[] = {widen_##SFX(out, n), widen_##SFX(ga, n), widen_##SFX(gb, n)};                             \
        const char *names[] = {"forward", "backward ga", "backward gb"};                                           \
        for (int k = 0; k < 3; k++) {                                                                              \
            snprintf(what, sizeof what, #SFX " silu_mul %s n=%lld", names[k], (long long)n);                       \
            expect_close(what, got[k], want + k * n, tol + k * n, n);                                              \
            free(got[k]);                                                                                          \
        }                                                                                                          \
        snprintf(what, sizeof what, #SFX " silu_mul gb alone n=%lld", (long long)n);                               \
        if (memcmp(gb, gb_only, sizeof(real) * (size_t)n) != 0) fail(what);                                        \
        free(a), free(b), free(g), free(out), free(ga), free(gb), free(gb_only), free(want), free(tol);            \
    }                                                                                                              \
                                                                                                                   \
    /* softmax_rows then exp_rows on p [rows, n] with some -inf entries and whole -inf rows. */                    \
    static void check_rows_##SFX(int64_t rows, int64_t n, int64_t period, int64_t count0, int64_t group,           \
                                 double scale)                                                                     \
    {                                                                                                              \
        char what[160];                                                                                            \
        const int64_t N = rows * n;                                                                                \
        real *p = random_##SFX(N, 100), *lse = alloc(sizeof(real) * (size_t)rows);                                 \
        for (int64_t i = 0; i < N; i++)                                                                            \
            if (uniform() > 0.8) p[i] = -INFINITY;                                                                 \
        for (int64_t i = 1; i < rows; i += 5)                                                                      \
            for (int64_t j = 0; j < n; j++) p[i * n + j] = -INFINITY;                                              \
        double *p0 = widen_##SFX(p, N), *want = alloc(sizeof(double) * (size_t)N);                                 \
        double *tol = alloc(sizeof(double) * (size_t)N), *wlse = alloc(sizeof(double) * (size_t)rows);             \
        double *tlse = alloc(sizeof(double) * (size_t)rows);                                                       \
        for (int64_t i = 0; i < rows; i++) {                                                                       \
            double m;                                                                                              \
            softmax_ref(want + i * n, wlse + i, &m, p0 + i * n, (real)scale, vis_of(i, n, period, count0, group),  \
                        n, sizeof(real) == 4);                                                                      \
            tlse[i] = RTOL * (fabs(m) + fabs(wlse[i] - m)) + FLOOR;                                                \
            for (int64_t j = 0; j < n; j++) tol[i * n + j] = RTOL * fabs(want[i * n + j]) + FLOOR * (1 + fabs(scale)); \
        }                                                                                                          \
        snprintf(what, sizeof what, #SFX " softmax_rows %lldx%lld period=%lld count0=%lld group=%lld",             \
                 (long long)rows, (long long)n, (long long)period, (long long)count0, (long long)group);           \
        if (softmax_rows_##SFX(p, lse, scale, rows, n, period, count0, group) != LORA_OK) fail(what);              \
        double *got = widen_##SFX(p, N), *glse = widen_##SFX(lse, rows);                                           \
        expect_close(what, got, want, tol, N);                                                                     \
        strcat(what, " lse");                                                                                      \
        expect_close(what, glse, wlse, tlse, rows);                                                                \
        free(got), free(glse);                                                                                     \
        /* exp_rows on the original scores with the (float-rounded) log-sum-exps: the probabilities again,         \
         * without the scale; a row with lse = +inf is all 0. */                                                   \
        real *q = alloc(sizeof(real) * (size_t)N);                                                                 \
        for (int64_t i = 0; i < N; i++) q[i] = (real)p0[i];                                                        \
        for (int64_t i = 0; i < rows; i++) {                                                                       \
            int64_t vis = isinf(lse[i]) && lse[i] > 0 ? 0 : vis_of(i, n, period, count0, group);                   \
            for (int64_t j = 0; j < n; j++) {                                                                      \
                double e = j < vis ? exp((double)(real)(q[i * n + j] - lse[i])) : 0;                               \
                want[i * n + j] = e;                                                                               \
                tol[i * n + j] = RTOL * e + FLOOR;                                                                 \
            }                                                                                                      \
        }                                                                                                          \
        snprintf(what, sizeof what, #SFX " exp_rows %lldx%lld period=%lld count0=%lld group=%lld",                 \
                 (long long)rows, (long long)n, (long long)period, (long long)count0, (long long)group);           \
        if (exp_rows_##SFX(q, lse, rows, n, period, count0, group) != LORA_OK) fail(what);                         \
        got = widen_##SFX(q, N);                                                                                   \
        expect_close(what, got, want, tol, N);                                                                     \
        free(got), free(q), free(p), free(lse), free(p0), free(want), free(tol), free(wlse), free(tlse);           \
    }                                                                                                              \
                                                                                                                   \
    /* 1 and 2 threads: identical bits, on sizes above the kernels' parallel threshold (1e5 elements). */          \
    static void check_threads_##SFX(int64_t rows, int64_t n)                                                       \
    {                                                                                                              \
        char what[96];                                                                                             \
        const int64_t N = rows * n;                                                                                \
        real *p0 = random_##SFX(N, 30), *g = random_##SFX(N, 1), *b = random_##SFX(N, 1);                          \
        real *r[2][5];                                                                                             \
        for (int t = 0; t < 2; t++) {                                                                              \
            lora_set_num_threads(t + 1);                                                                           \
            for (int k = 0; k < 5; k++) r[t][k] = alloc(sizeof(real) * (size_t)N);                                 \
            real *lse = alloc(sizeof(real) * (size_t)rows);                                                        \
            memcpy(r[t][0], p0, sizeof(real) * (size_t)N);                                                         \
            memcpy(r[t][1], p0, sizeof(real) * (size_t)N);                                                         \
            int st = softmax_rows_##SFX(r[t][0], lse, 0.5, rows, n, 7, n / 2, 2);                                  \
            st |= exp_rows_##SFX(r[t][1], lse, rows, n, 7, n / 2, 2);                                              \
            st |= silu_mul_forward_##SFX(r[t][2], p0, b, N);                                                       \
            st |= silu_mul_backward_##SFX(r[t][3], r[t][4], g, p0, b, N);                                          \
            if (st != LORA_OK) fail(#SFX " threads: status");                                                      \
            free(lse);                                                                                             \
        }                                                                                                          \
        const char *names[] = {"softmax_rows", "exp_rows", "silu_mul_forward", "silu_mul_backward ga",             \
                               "silu_mul_backward gb"};                                                            \
        for (int k = 0; k < 5; k++) {                                                                              \
            snprintf(what, sizeof what, #SFX " %s %lldx%lld", names[k], (long long)rows, (long long)n);            \
            expect_equal(what, r[0][k], r[1][k], sizeof(real) * (size_t)N);                                        \
            free(r[0][k]), free(r[1][k]);                                                                          \
        }                                                                                                          \
        lora_set_num_threads(0);                                                                                   \
        free(p0), free(g), free(b);                                                                                \
    }                                                                                                              \
                                                                                                                   \
    /* NULL pointers and bad sizes: LORA_EINVAL, and no element written. */                                        \
    static void check_errors_##SFX(void)                                                                           \
    {                                                                                                              \
        real x[3] = {1, 2, 3}, y[3] = {4, 5, 6}, o[3] = {7, 8, 9}, l[1] = {10};                                    \
        const real o0[3] = {7, 8, 9};                                                                              \
        struct {                                                                                                   \
            const char *what;                                                                                      \
            int status;                                                                                            \
        } calls[] = {                                                                                              \
            {"silu_mul_forward out=NULL", silu_mul_forward_##SFX(NULL, x, y, 3)},                                  \
            {"silu_mul_forward a=NULL", silu_mul_forward_##SFX(o, NULL, y, 3)},                                    \
            {"silu_mul_forward b=NULL", silu_mul_forward_##SFX(o, x, NULL, 3)},                                    \
            {"silu_mul_forward n<0", silu_mul_forward_##SFX(o, x, y, -1)},                                         \
            {"silu_mul_backward g=NULL", silu_mul_backward_##SFX(o, NULL, NULL, x, y, 3)},                         \
            {"silu_mul_backward a=NULL", silu_mul_backward_##SFX(o, NULL, x, NULL, y, 3)},                         \
            {"silu_mul_backward ga without b", silu_mul_backward_##SFX(o, NULL, x, y, NULL, 3)},                   \
            {"silu_mul_backward n<0", silu_mul_backward_##SFX(NULL, o, x, y, y, -3)},                              \
            {"softmax_rows p=NULL", softmax_rows_##SFX(NULL, l, 1.0, 1, 3, 1, 3, 1)},                              \
            {"softmax_rows lse=NULL", softmax_rows_##SFX(o, NULL, 1.0, 1, 3, 1, 3, 1)},                            \
            {"softmax_rows period=0", softmax_rows_##SFX(o, l, 1.0, 1, 3, 0, 3, 1)},                               \
            {"softmax_rows group=0", softmax_rows_##SFX(o, l, 1.0, 1, 3, 1, 3, 0)},                                \
            {"softmax_rows rows<0", softmax_rows_##SFX(o, l, 1.0, -1, 3, 1, 3, 1)},                                \
            {"softmax_rows n<0", softmax_rows_##SFX(o, l, 1.0, 1, -3, 1, 3, 1)},                                   \
            {"exp_rows p=NULL", exp_rows_##SFX(NULL, l, 1, 3, 1, 3, 1)},                                           \
            {"exp_rows lse=NULL", exp_rows_##SFX(o, NULL, 1, 3, 1, 3, 1)},                                         \
            {"exp_rows period=0", exp_rows_##SFX(o, l, 1, 3, 0, 3, 1)},                                            \
            {"exp_rows group=-1", exp_rows_##SFX(o, l, 1, 3, 1, 3, -1)},                                           \
            {"exp_rows rows<0", exp_rows_##SFX(o, l, -2, 3, 1, 3, 1)},                                             \
        };                                                                                                         \
        for (size_t c = 0; c < sizeof calls / sizeof calls[0]; c++) {                                              \
            char what[96];                                                                                         \
            snprintf(what, sizeof what, #SFX " %s -> LORA_EINVAL", calls[c].what);                                 \
            if (calls[c].status != LORA_EINVAL) fail(what);                                                        \
        }                                                                                                          \
        if (memcmp(o, o0, sizeof o) != 0 || l[0] != 10) fail(#SFX " a refused call wrote its output");            \
        if (silu_mul_backward_##SFX(NULL, NULL, x, y, NULL, 3) != LORA_OK) fail(#SFX " no output asked: LORA_OK"); \
    }

CHECKS(double, f64, 1e-12, 4 * DBL_MIN)
CHECKS(float, f32, 1e-5, 4 * (double)FLT_MIN)

/* float32 vector exp near its edges, through exp_rows with lse = 0 (so p = exp(x)): within 2 ulp of
 * libm over [-87.33, 88.37]; 0 for -inf and below FLT_MIN's log; NaN kept; +inf for +inf. */
static void check_f32_exp_edges(void)
{
    enum { N = 4099 };
    float *x = alloc(sizeof(float) * N), *lse = alloc(sizeof(float));
    double *want = alloc(sizeof(double) * N), *tol = alloc(sizeof(double) * N);
    lse[0] = 0;
    for (int i = 0; i < N - 5; i++) {
        x[i] = (float)(-87.33 + (88.37 + 87.33) * i / (N - 6));
        if (i % 7 == 0) x[i] = (float)(-87.33 + 0.002 * (i % 100)); /* crowd both ends */
        if (i % 7 == 1) x[i] = (float)(88.37 - 0.002 * (i % 100));
    }
    x[N - 5] = -INFINITY, x[N - 4] = NAN, x[N - 3] = INFINITY, x[N - 2] = -87.4f, x[N - 1] = -150.0f;
    for (int i = 0; i < N; i++) {
        want[i] = exp((double)x[i]);
        tol[i] = 2 * (double)nextafterf((float)want[i], INFINITY) - 2 * (double)(float)want[i]; /* ~2 ulp */
        if (i >= N - 2) want[i] = 0, tol[i] = 2 * (double)FLT_MIN;                    /* below FLT_MIN: 0 */
    }
    if (exp_rows_f32(x, lse, 1, N, 1, N, 1) != LORA_OK) fail("f32 exp edges status");
    double *got = widen_f32(x, N);
    expect_close("f32 vector exp edges (2 ulp)", got, want, tol, N);
    free(got), free(x), free(lse), free(want), free(tol);
}

/* ---- attention_forward / attention_backward --------------------------------------------------------
 * Grouped-query attention with q head hq = h * g + j on key/value head h. The reference works on dense
 * (B, Hq, T, D) copies of q, dout (and gives out, dq in that order), dense (B, Hkv, S, D) k, v, dk, dv
 * and (B, Hkv, T, g) lse, in double, from the definition: scores s = scale q.k (scale rounded to the
 * element type, as the kernel does), causal: query t sees keys s <= t + S - T, P = softmax over those,
 * out = P v, lse = log-sum-exp of the visible scores (+inf, with out = 0 and dq = 0, when none is),
 * delta = dout.out, dS = P (dout.v - delta), dq = scale dS k, dk = scale dS^T q, dv = P^T dout.
 * Tolerance, first order in RTOL (the differences of rounding, relative to the magnitude of the terms):
 * a score may be off by RTOL * A with A = |scale| |q|.|k|; so P by P * rP, rP = RTOL (3 + A + max A +
 * |lse|), giving Pt = P (RTOL + rP) + FLOOR; out by Pt.|v|; delta, dS, dq, dk, dv likewise (the same
 * propagation as tests/test_attention_kernel.py). */

typedef struct {
    int64_t B, Hkv, g, T, S, D;
    int causal;
    double scale;
} attn_case;

/* Where q, out, dq, dout live: kind 0 dense (B, Hq, T, D); 1 (B, T, Hq, D), the transpose a model
 * passes; 2 (B, T, Hq, D + 3), each row after 3 pad elements (the last element ends the buffer);
 * 3 dense (B, Hq, T, D) with the positions reversed (a negative stride; the base is in the middle).
 * strides: (batch, key/value head, position, query head in its group), in elements, as the kernels
 * take them; base: the offset of element (0, 0, 0, 0); n: the buffer's length. */
typedef struct {
    int64_t s[4], base, n;
} attn_layout;

static attn_layout attn_layout_of(int kind, const attn_case *c)
{
    const int64_t Hq = c->Hkv * c->g, T = c->T, D = c->D, g = c->g;
    attn_layout l = {{0, 0, 0, 0}, 0, c->B * Hq * T * D};
    if (kind == 0 || kind == 3) {
        int64_t sh = T * D;
        l.s[0] = Hq * sh, l.s[1] = g * sh, l.s[2] = D, l.s[3] = sh;
        if (kind == 3 && T > 0) l.s[2] = -D, l.base = (T - 1) * D;
    } else {
        int64_t row = kind == 1 ? D : D + 3;
        l.s[0] = T * Hq * row, l.s[1] = g * row, l.s[2] = Hq * row, l.s[3] = row;
        l.base = kind == 1 ? 0 : 3;
        l.n = c->B * T * Hq * row;
    }
    return l;
}

/* The buffer index of element (b, query head hq, position t, e). */
static int64_t attn_index(const attn_layout *l, const attn_case *c, int64_t b, int64_t hq, int64_t t, int64_t e)
{
    return l->base + b * l->s[0] + (hq / c->g) * l->s[1] + t * l->s[2] + (hq % c->g) * l->s[3] + e;
}

/* mask [n]: 1 where the layout keeps an element of the (B, Hq, T, D) array, 0 on padding. */
static char *attn_mask(const attn_layout *l, const attn_case *c)
{
    const int64_t Hq = c->Hkv * c->g;
    char *m = alloc((size_t)l->n);
    memset(m, 0, (size_t)l->n);
    for (int64_t b = 0; b < c->B; b++)
        for (int64_t hq = 0; hq < Hq; hq++)
            for (int64_t t = 0; t < c->T; t++)
                for (int64_t e = 0; e < c->D; e++) m[attn_index(l, c, b, hq, t, e)] = 1;
    return m;
}

static int64_t attn_visible(const attn_case *c, int64_t t)
{
    if (!c->causal) return c->S;
    int64_t n = t + 1 + c->S - c->T;
    return n < 0 ? 0 : n > c->S ? c->S : n;
}

/* want / tol: out [B, Hq, T, D], lse [B, Hkv, T, g], dq [B, Hq, T, D], dk, dv [B, Hkv, S, D], each a
 * separately malloc'ed array (index 0..4). scale is the kernel's, already rounded to the element type. */
static void attention_ref(double *want[5], double *tol[5], const attn_case *c, const double *q, const double *k,
                          const double *v, const double *dout, double scale, double rtol, double floor_)
{
    const int64_t B = c->B, Hkv = c->Hkv, g = c->g, T = c->T, S = c->S, D = c->D, Hq = Hkv * g;
    double *sc = alloc(sizeof(double) * (size_t)S), *A = alloc(sizeof(double) * (size_t)S);
    double *P = alloc(sizeof(double) * (size_t)S), *Pt = alloc(sizeof(double) * (size_t)S);
    double *dP = alloc(sizeof(double) * (size_t)S), *G = alloc(sizeof(double) * (size_t)S);
    for (int w = 0; w < 5; w++) {
        int64_t n = w == 1 ? B * Hkv * T * g : w >= 3 ? B * Hkv * S * D : B * Hq * T * D;
        for (int64_t i = 0; i < n; i++) want[w][i] = 0, tol[w][i] = 0;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t hq = 0; hq < Hq; hq++)
            for (int64_t t = 0; t < T; t++) {
                const int64_t h = hq / g, row = ((b * Hq + hq) * T + t) * D, kv = (b * Hkv + h) * S * D;
                const int64_t li = ((b * Hkv + h) * T + t) * g + hq % g, vis = attn_visible(c, t);
                const double *qr = q + row, *dor = dout + row;
                double *o = want[0] + row, *ot = tol[0] + row, *dq = want[2] + row, *dqt = tol[2] + row;
                if (vis == 0) { /* no key: out = 0, dq = 0, lse = +inf */
                    want[1][li] = INFINITY;
                    for (int64_t e = 0; e < D; e++) ot[e] = dqt[e] = floor_;
                    continue;
                }
                double m = -INFINITY, Amax = 0, sum = 0;
                for (int64_t s = 0; s < vis; s++) {
                    double acc = 0, mag = 0;
                    for (int64_t e = 0; e < D; e++) acc += qr[e] * k[kv + s * D + e], mag += fabs(qr[e] * k[kv + s * D + e]);
                    sc[s] = scale * acc, A[s] = fabs(scale) * mag;
                    m = fmax(m, sc[s]), Amax = fmax(Amax, A[s]);
                }
                for (int64_t s = 0; s < vis; s++) sum += exp(sc[s] - m);
                const double lse = m + log(sum);
                want[1][li] = lse;
                tol[1][li] = rtol * (fabs(m) + fabs(lse - m) + Amax) + floor_;
                for (int64_t s = 0; s < vis; s++) {
                    P[s] = exp(sc[s] - lse);
                    Pt[s] = P[s] * (rtol + rtol * (3 + A[s] + Amax + fabs(lse))) + floor_;
                }
                double delta = 0, dmag = 0, dtol = 0;
                for (int64_t e = 0; e < D; e++) {
                    double acc = 0, at = 0;
                    for (int64_t s = 0; s < vis; s++) acc += P[s] * v[kv + s * D + e], at += Pt[s] * fabs(v[kv + s * D + e]);
                    o[e] = acc, ot[e] = at;
                }
                for (int64_t e = 0; e < D; e++) delta += dor[e] * o[e], dmag += fabs(dor[e] * o[e]), dtol += fabs(dor[e]) * ot[e];
                dtol += rtol * dmag;
                for (int64_t s = 0; s < vis; s++) {
                    double acc = 0, mag = 0;
                    for (int64_t e = 0; e < D; e++) acc += dor[e] * v[kv + s * D + e], mag += fabs(dor[e] * v[kv + s * D + e]);
                    dP[s] = acc, G[s] = mag;
                }
                for (int64_t s = 0; s < vis; s++) {
                    const double dS = P[s] * (dP[s] - delta);
                    const double dSt = Pt[s] * fabs(dP[s] - delta) + P[s] * (rtol * G[s] + dtol) + rtol * fabs(dS);
                    for (int64_t e = 0; e < D; e++) {
                        const double kk = k[kv + s * D + e];
                        dq[e] += scale * dS * kk, dqt[e] += fabs(scale) * dSt * fabs(kk);
                        want[3][kv + s * D + e] += scale * dS * qr[e];
                        tol[3][kv + s * D + e] += fabs(scale) * dSt * fabs(qr[e]);
                        want[4][kv + s * D + e] += P[s] * dor[e];
                        tol[4][kv + s * D + e] += Pt[s] * fabs(dor[e]);
                    }
                }
                for (int64_t e = 0; e < D; e++) dqt[e] += floor_;
            }
    for (int w = 3; w < 5; w++)
        for (int64_t i = 0; i < B * Hkv * S * D; i++) tol[w][i] += floor_;
    free(sc), free(A), free(P), free(Pt), free(dP), free(G);
}

#define ATTENTION_CHECKS(real, SFX, RTOL, FLOOR)                                                                   \
    /* A (B, Hq, T, D) array in a layout: the values of dense (canonical order) at the kept elements, pad         \
     * elsewhere. */                                                                                               \
    static real *attn_scatter_##SFX(const double *dense, const attn_layout *l, const attn_case *c, real pad)       \
    {                                                                                                              \
        real *a = alloc(sizeof(real) * (size_t)l->n);                                                              \
        for (int64_t i = 0; i < l->n; i++) a[i] = pad;                                                             \
        for (int64_t b = 0, i = 0; b < c->B; b++)                                                                  \
            for (int64_t hq = 0; hq < c->Hkv * c->g; hq++)                                                         \
                for (int64_t t = 0; t < c->T; t++)                                                                 \
                    for (int64_t e = 0; e < c->D; e++, i++) a[attn_index(l, c, b, hq, t, e)] = (real)dense[i];     \
        return a;                                                                                                  \
    }                                                                                                              \
    /* The kept elements in canonical (B, Hq, T, D) order; 1 in *pads_ok unless a pad lost its NaN. */              \
    static double *attn_gather_##SFX(const real *a, const attn_layout *l, const attn_case *c, int *pads_ok)        \
    {                                                                                                              \
        double *d = alloc(sizeof(double) * (size_t)(c->B * c->Hkv * c->g * c->T * c->D));                          \
        for (int64_t b = 0, i = 0; b < c->B; b++)                                                                  \
            for (int64_t hq = 0; hq < c->Hkv * c->g; hq++)                                                         \
                for (int64_t t = 0; t < c->T; t++)                                                                 \
                    for (int64_t e = 0; e < c->D; e++, i++) d[i] = a[attn_index(l, c, b, hq, t, e)];               \
        char *m = attn_mask(l, c);                                                                                 \
        for (int64_t i = 0; i < l->n; i++)                                                                         \
            if (!m[i] && a[i] == a[i]) *pads_ok = 0;                                                               \
        free(m);                                                                                                   \
        return d;                                                                                                  \
    }                                                                                                              \
    static real *attn_nans_##SFX(int64_t n)                                                                        \
    {                                                                                                              \
        real *a = alloc(sizeof(real) * (size_t)n);                                                                 \
        for (int64_t i = 0; i < n; i++) a[i] = (real)NAN;                                                          \
        return a;                                                                                                  \
    }                                                                                                              \
                                                                                                                   \
    /* Forward, then backward with every combination of NULL gradient outputs, against attention_ref.            \
     * Layouts of q, out, dq, dout: the four digits of `layouts`. Every output starts as NaN (so an element       \
     * not written, or a gradient accumulated instead of overwritten, shows), pads of out and dq must stay NaN,   \
     * pads of q and dout are NaN (reading one would show). */                                                     \
    static void check_attention_##SFX(attn_case c, int layouts, double mag)                                        \
    {                                                                                                              \
        char what[200], name[160];                                                                                 \
        const int64_t Hq = c.Hkv * c.g, NQ = c.B * Hq * c.T * c.D, NK = c.B * c.Hkv * c.S * c.D;                   \
        const int64_t NL = c.B * c.Hkv * c.T * c.g;                                                                \
        const attn_layout lq = attn_layout_of(layouts / 1000 % 10, &c), lo = attn_layout_of(layouts / 100 % 10, &c); \
        const attn_layout ld = attn_layout_of(layouts / 10 % 10, &c), lg = attn_layout_of(layouts % 10, &c);        \
        snprintf(name, sizeof name, #SFX " attention B=%lld Hkv=%lld g=%lld T=%lld S=%lld D=%lld causal=%d "        \
                 "layouts=%04d",                                                                                   \
                 (long long)c.B, (long long)c.Hkv, (long long)c.g, (long long)c.T, (long long)c.S, (long long)c.D,  \
                 c.causal, layouts);                                                                               \
        /* Inputs, rounded to real, then widened for the reference. */                                            \
        real *qd = random_##SFX(NQ, mag), *gd = random_##SFX(NQ, 1);                                               \
        real *k = random_##SFX(NK, mag), *v = random_##SFX(NK, 1);                                                 \
        double *q64 = widen_##SFX(qd, NQ), *g64 = widen_##SFX(gd, NQ), *k64 = widen_##SFX(k, NK);                  \
        double *v64 = widen_##SFX(v, NK);                                                                          \
        real *q = attn_scatter_##SFX(q64, &lq, &c, (real)NAN), *dout = attn_scatter_##SFX(g64, &lg, &c, (real)NAN); \
        double *want[5], *tol[5];                                                                                  \
        const int64_t sizes[5] = {NQ, NL, NQ, NK, NK};                                                             \
        for (int w = 0; w < 5; w++)                                                                                \
            want[w] = alloc(sizeof(double) * (size_t)sizes[w]), tol[w] = alloc(sizeof(double) * (size_t)sizes[w]); \
        attention_ref(want, tol, &c, q64, k64, v64, g64, (double)(real)c.scale, RTOL, FLOOR);                      \
                                                                                                                   \
        real *out = attn_nans_##SFX(lo.n), *lse = attn_nans_##SFX(NL);                                             \
        int st = attention_forward_##SFX(out + lo.base, lse, q + lq.base, k, v, c.scale, c.causal, c.B, c.Hkv,     \
                                         c.g, c.T, c.S, c.D, lq.s, lo.s);                                          \
        snprintf(what, sizeof what, "%s forward status", name);                                                    \
        if (st != LORA_OK) fail(what);                                                                             \
        int pads_ok = 1;                                                                                           \
        double *got = attn_gather_##SFX(out, &lo, &c, &pads_ok);                                                   \
        snprintf(what, sizeof what, "%s out", name);                                                               \
        expect_close(what, got, want[0], tol[0], NQ);                                                              \
        free(got);                                                                                                 \
        got = widen_##SFX(lse, NL);                                                                                \
        snprintf(what, sizeof what, "%s lse", name);                                                               \
        expect_close(what, got, want[1], tol[1], NL);                                                              \
        free(got);                                                                                                 \
                                                                                                                   \
        real *full[3] = {NULL, NULL, NULL};                                                                        \
        const int64_t glen[3] = {ld.n, NK, NK};                                                                    \
        for (int need = 7; need >= 0; need--) { /* bit 4: dq, 2: dk, 1: dv; 7 first, the others against it */     \
            real *gr[3];                                                                                           \
            for (int w = 0; w < 3; w++) gr[w] = need & (4 >> w) ? attn_nans_##SFX(glen[w]) : NULL;                \
            st = attention_backward_##SFX(gr[0] ? gr[0] + ld.base : NULL, gr[1], gr[2], dout + lg.base,            \
                                          q + lq.base, k, v, out + lo.base, lse, c.scale, c.causal, c.B, c.Hkv,    \
                                          c.g, c.T, c.S, c.D, ld.s, lg.s, lq.s, lo.s);                             \
            snprintf(what, sizeof what, "%s backward need=%d status", name, need);                                 \
            if (st != LORA_OK) fail(what);                                                                         \
            if (need == 7) {                                                                                       \
                const char *names[3] = {"dq", "dk", "dv"};                                                         \
                for (int w = 0; w < 3; w++) {                                                                      \
                    got = w == 0 ? attn_gather_##SFX(gr[0], &ld, &c, &pads_ok) : widen_##SFX(gr[w], NK);           \
                    snprintf(what, sizeof what, "%s %s", name, names[w]);                                          \
                    expect_close(what, got, want[2 + w], tol[2 + w], sizes[2 + w]);                                \
                    free(got);                                                                                     \
                    full[w] = gr[w];                                                                               \
                }                                                                                                  \
                continue;                                                                                          \
            }                                                                                                      \
            for (int w = 0; w < 3; w++) {                                                                          \
                if (!gr[w]) continue;                                                                              \
                snprintf(what, sizeof what, "%s need=%d %s alone", name, need, w == 0 ? "dq" : w == 1 ? "dk" : "dv"); \
                int same = 1;                                                                                      \
                for (int64_t i = 0; i < glen[w]; i++) /* NaN pads compare as equal */                              \
                    same &= memcmp(gr[w] + i, full[w] + i, sizeof(real)) == 0;                                     \
                if (!same) {                                                                                       \
                    failures++;                                                                                    \
                    printf("%-44s differs from the call with all three FAIL\n", what);                             \
                }                                                                                                  \
                free(gr[w]);                                                                                       \
            }                                                                                                      \
        }                                                                                                          \
        snprintf(what, sizeof what, "%s: a pad of out or dq was written", name);                                   \
        if (!pads_ok) fail(what);                                                                                  \
        for (int w = 0; w < 3; w++) free(full[w]);                                                                 \
        for (int w = 0; w < 5; w++) free(want[w]), free(tol[w]);                                                   \
        free(qd), free(gd), free(k), free(v), free(q64), free(g64), free(k64), free(v64), free(q), free(dout);     \
        free(out), free(lse);                                                                                      \
    }                                                                                                              \
                                                                                                                   \
    /* 1 and 2 threads: identical bits (B * Hkv = 6 tasks, far above the parallel threshold). */                   \
    static void check_attention_threads_##SFX(int causal)                                                          \
    {                                                                                                              \
        const attn_case c = {2, 3, 3, 70, 70, 33, causal, 0.3};                                                    \
        const attn_layout l = attn_layout_of(1, &c);                                                               \
        const int64_t NQ = l.n, NK = c.B * c.Hkv * c.S * c.D, NL = c.B * c.Hkv * c.T * c.g;                        \
        real *q = random_##SFX(NQ, 2), *dout = random_##SFX(NQ, 1), *k = random_##SFX(NK, 2);                     \
        real *v = random_##SFX(NK, 1), *r[2][5];                                                                   \
        const int64_t n[5] = {NQ, NL, NQ, NK, NK};                                                                 \
        for (int t = 0; t < 2; t++) {                                                                              \
            lora_set_num_threads(t + 1);                                                                           \
            for (int w = 0; w < 5; w++) r[t][w] = alloc(sizeof(real) * (size_t)n[w]);                              \
            int st = attention_forward_##SFX(r[t][0], r[t][1], q, k, v, c.scale, causal, c.B, c.Hkv, c.g, c.T,     \
                                             c.S, c.D, l.s, l.s);                                                  \
            st |= attention_backward_##SFX(r[t][2], r[t][3], r[t][4], dout, q, k, v, r[t][0], r[t][1], c.scale,   \
                                           causal, c.B, c.Hkv, c.g, c.T, c.S, c.D, l.s, l.s, l.s, l.s);            \
            if (st != LORA_OK) fail(#SFX " attention threads: status");                                            \
        }                                                                                                          \
        const char *names[5] = {"out", "lse", "dq", "dk", "dv"};                                                   \
        for (int w = 0; w < 5; w++) {                                                                              \
            char what[96];                                                                                         \
            snprintf(what, sizeof what, #SFX " attention %s causal=%d", names[w], causal);                         \
            expect_equal(what, r[0][w], r[1][w], sizeof(real) * (size_t)n[w]);                                    \
            free(r[0][w]), free(r[1][w]);                                                                          \
        }                                                                                                          \
        lora_set_num_threads(0);                                                                                   \
        free(q), free(dout), free(k), free(v);                                                                     \
    }                                                                                                              \
                                                                                                                   \
    /* NULL pointers and bad sizes: LORA_EINVAL, and no output written. B = Hkv = T = S = 1, g = 2, D = 3. */      \
    static void check_attention_errors_##SFX(void)                                                                 \
    {                                                                                                              \
        real q[6] = {1, 2, 3, 4, 5, 6}, k[3] = {1, 0, 1}, v[3] = {2, 1, 0}, o[6], l[2], dq[6], dk[3], dv[3];       \
        const int64_t s[4] = {6, 6, 6, 3};                                                                         \
        for (int i = 0; i < 6; i++) o[i] = dq[i] = 7;                                                              \
        l[0] = l[1] = dk[0] = dk[1] = dk[2] = dv[0] = dv[1] = dv[2] = 7;                                           \
        struct {                                                                                                   \
            const char *what;                                                                                      \
            int status;                                                                                            \
        } calls[] = {                                                                                              \
            {"forward B<0", attention_forward_##SFX(o, l, q, k, v, 1, 1, -1, 1, 2, 1, 1, 3, s, s)},                \
            {"forward Hkv<0", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, -1, 2, 1, 1, 3, s, s)},              \
            {"forward g=0", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, 1, 0, 1, 1, 3, s, s)},                 \
            {"forward T<0", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, 1, 2, -1, 1, 3, s, s)},                \
            {"forward S<0", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, 1, 2, 1, -1, 3, s, s)},                \
            {"forward D=0", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, 1, 2, 1, 1, 0, s, s)},                 \
            {"forward out=NULL", attention_forward_##SFX(NULL, l, q, k, v, 1, 1, 1, 1, 2, 1, 1, 3, s, s)},         \
            {"forward lse=NULL", attention_forward_##SFX(o, NULL, q, k, v, 1, 1, 1, 1, 2, 1, 1, 3, s, s)},         \
            {"forward q=NULL", attention_forward_##SFX(o, l, NULL, k, v, 1, 1, 1, 1, 2, 1, 1, 3, s, s)},           \
            {"forward k=NULL", attention_forward_##SFX(o, l, q, NULL, v, 1, 1, 1, 1, 2, 1, 1, 3, s, s)},           \
            {"forward v=NULL", attention_forward_##SFX(o, l, q, k, NULL, 1, 1, 1, 1, 2, 1, 1, 3, s, s)},           \
            {"forward q_strides=NULL", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, 1, 2, 1, 1, 3, NULL, s)},   \
            {"forward out_strides=NULL", attention_forward_##SFX(o, l, q, k, v, 1, 1, 1, 1, 2, 1, 1, 3, s, NULL)}, \
            {"backward B<0", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, -1, 1, 2, 1, 1, 3, s, s,  \
                                                      s, s)},                                                      \
            {"backward g=0", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 0, 1, 1, 3, s, s,   \
                                                      s, s)},                                                      \
            {"backward S<0", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1, -1, 3, s, s,  \
                                                      s, s)},                                                      \
            {"backward D=0", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1, 1, 0, s, s,   \
                                                      s, s)},                                                      \
            {"backward T<0", attention_backward_##SFX(NULL, NULL, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, -1, 1, 3, s, \
                                                      s, s, s)},                                                   \
            {"backward dout=NULL", attention_backward_##SFX(dq, dk, dv, NULL, q, k, v, q, l, 1, 1, 1, 1, 2, 1, 1,   \
                                                            3, s, s, s, s)},                                       \
            {"backward q=NULL", attention_backward_##SFX(dq, dk, dv, q, NULL, k, v, q, l, 1, 1, 1, 1, 2, 1, 1, 3,   \
                                                         s, s, s, s)},                                             \
            {"backward k=NULL", attention_backward_##SFX(dq, dk, dv, q, q, NULL, v, q, l, 1, 1, 1, 1, 2, 1, 1, 3,   \
                                                         s, s, s, s)},                                             \
            {"backward v=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, NULL, q, l, 1, 1, 1, 1, 2, 1, 1, 3,   \
                                                         s, s, s, s)},                                             \
            {"backward out=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, v, NULL, l, 1, 1, 1, 1, 2, 1, 1, 3, \
                                                           s, s, s, s)},                                           \
            {"backward lse=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, NULL, 1, 1, 1, 1, 2, 1, 1, 3, \
                                                           s, s, s, s)},                                           \
            {"backward dq_strides=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1,   \
                                                                  1, 3, NULL, s, s, s)},                           \
            {"backward dout_strides=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1, \
                                                                    1, 3, s, NULL, s, s)},                         \
            {"backward q_strides=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1, 1, \
                                                                 3, s, s, NULL, s)},                               \
            {"backward out_strides=NULL", attention_backward_##SFX(dq, dk, dv, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1,  \
                                                                   1, 3, s, s, s, NULL)},                          \
            {"backward no output, q=NULL", attention_backward_##SFX(NULL, NULL, NULL, q, NULL, k, v, q, l, 1, 1, 1, \
                                                                    1, 2, 1, 1, 3, s, s, s, s)},                   \
        };                                                                                                         \
        for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {                                              \
            char what[96];                                                                                         \
            snprintf(what, sizeof what, #SFX " attention %s -> LORA_EINVAL", calls[i].what);                       \
            if (calls[i].status != LORA_EINVAL) fail(what);                                                        \
        }                                                                                                          \
        int touched = l[0] != 7 || l[1] != 7;                                                                      \
        for (int i = 0; i < 6; i++) touched |= o[i] != 7 || dq[i] != 7;                                            \
        for (int i = 0; i < 3; i++) touched |= dk[i] != 7 || dv[i] != 7;                                           \
        if (touched) fail(#SFX " attention: a refused call wrote an output");                                      \
        if (attention_backward_##SFX(NULL, NULL, NULL, q, q, k, v, q, l, 1, 1, 1, 1, 2, 1, 1, 3, s, s, s, s) !=     \
            LORA_OK)                                                                                               \
            fail(#SFX " attention_backward with no output: LORA_OK");                                              \
    }

ATTENTION_CHECKS(double, f64, 1e-12, 4 * DBL_MIN)
ATTENTION_CHECKS(float, f32, 1e-5, 4 * (double)FLT_MIN)

/* B, Hkv, g, T, S, D, causal, scale; the layouts of q, out, dq, dout; the magnitude of q and k. */
static const struct {
    attn_case c;
    int layouts;
    double mag;
} attention_cases[] = {
    {{1, 1, 1, 1, 1, 1, 0, 1.0}, 0, 1},        /* everything 1 */
    {{1, 1, 1, 1, 1, 1, 1, -0.5}, 1111, 1},
    {{2, 1, 3, 1, 5, 17, 1, 0.7}, 1230, 2},    /* T = 1: the one row sees every key */
    {{1, 2, 1, 5, 1, 3, 1, 1.3}, 2301, 2},     /* S = 1, T > S causal: rows 0..3 see no key */
    {{2, 2, 3, 9, 4, 17, 1, 0.25}, 3012, 2},   /* T > S causal with g = 3 */
    {{1, 1, 3, 4, 9, 17, 1, 0.5}, 1102, 2},    /* T < S causal: every row sees S - T + t + 1 keys */
    {{1, 3, 3, 7, 11, 1, 1, 2.0}, 2222, 2},    /* D = 1 */
    {{1, 1, 5, 20, 20, 1, 1, 0.9}, 1313, 2},   /* D = 1, g = 5 */
    {{2, 3, 1, 50, 61, 16, 0, -0.3}, 123, 2},  /* a full register tile, two blocks */
    {{1, 2, 3, 70, 70, 17, 1, 0.24}, 1021, 2}, /* blocks of 16 positions, the last short */
    {{1, 1, 1, 49, 30, 8, 1, 0.35}, 3333, 2},  /* 48 + 1 positions, 19 blind */
    {{2, 1, 2, 3, 70, 65, 0, 0.12}, 2130, 2},
    {{1, 1, 4, 13, 13, 33, 1, 0.0}, 1, 2},    /* scale 0: uniform over the visible keys */
    {{1, 2, 2, 6, 9, 16, 0, 0.25}, 1100, 30},  /* scores in the hundreds: near one-hot rows */
    {{1, 1, 2, 9, 6, 8, 1, 0.25}, 1212, 30},
    {{1, 1, 2, 3, 0, 4, 1, 0.5}, 1111, 1},     /* S = 0: no key at all */
    {{1, 1, 2, 3, 0, 4, 0, 0.5}, 2222, 1},
    {{1, 2, 2, 0, 5, 4, 1, 0.5}, 1111, 1},     /* T = 0 */
    {{0, 2, 2, 3, 5, 4, 1, 0.5}, 1111, 1},     /* B = 0 */
};

static void check_attention_all(void)
{
    for (size_t i = 0; i < sizeof attention_cases / sizeof attention_cases[0]; i++) {
        check_attention_f64(attention_cases[i].c, attention_cases[i].layouts, attention_cases[i].mag);
        check_attention_f32(attention_cases[i].c, attention_cases[i].layouts, attention_cases[i].mag);
    }
    for (int causal = 0; causal < 2; causal++) check_attention_threads_f64(causal), check_attention_threads_f32(causal);
    check_attention_errors_f64();
    check_attention_errors_f32();
}

/* ---- rms_norm_forward / rms_norm_backward and rotary ------------------------------------------------
 * References in double from the definitions in lora_np.h, on the element type's inputs. Tolerance,
 * relative to the magnitude of the terms: y = x r w against RTOL |y| (r from the inputs; the kernel sums
 * the squares in VL lanes of the element type); rstd against RTOL r; gx = r (g w - xhat c), c = mean(g w
 * xhat), xhat = x r (r: the kernel's rstd, an input of the backward) against RTOL r (|g w| + |xhat|
 * mean|g w xhat|) since the two terms may cancel; gweight (start + sum over rows of g xhat) against
 * RTOL (|start| + sum |g xhat|); rotary, two products per element, against RTOL times their sum of
 * absolute values. */

#define NORM_ROTARY_CHECKS(real, SFX, RTOL)                                                                        \
    /* rms_norm_forward on x [rows, n] (weight or NULL), then rms_norm_backward with the kernel's rstd;            \
     * gx starts as NaN (an element not written shows), gweight at random values (it accumulates). Then            \
     * gx alone and gweight alone (NULL for the other) give the full call's bits, and nothing asked is             \
     * LORA_OK. */                                                                                                 \
    static void check_rms_norm_##SFX(int64_t rows, int64_t n, int weighted, double mag, double eps)                \
    {                                                                                                              \
        char name[128], what[192];                                                                                 \
        const int64_t N = rows * n;                                                                                \
        snprintf(name, sizeof name, #SFX " rms_norm %lldx%lld weight=%d mag=%g eps=%g", (long long)rows,           \
                 (long long)n, weighted, mag, eps);                                                                \
        real *x = random_##SFX(N, mag), *g = random_##SFX(N, 1), *w = weighted ? random_##SFX(n, 2) : NULL;        \
        real *y = attn_nans_##SFX(N), *rstd = attn_nans_##SFX(rows), *gx = attn_nans_##SFX(N);                     \
        real *gx1 = attn_nans_##SFX(N), *gw = random_##SFX(n, 0.5), *gw1 = alloc(sizeof(real) * (size_t)n);        \
        memcpy(gw1, gw, sizeof(real) * (size_t)n);                                                                 \
        double *want = alloc(sizeof(double) * (size_t)N), *tol = alloc(sizeof(double) * (size_t)N);                \
        double *wr = alloc(sizeof(double) * (size_t)rows), *tr = alloc(sizeof(double) * (size_t)rows);             \
        double *wg = widen_##SFX(gw, n), *tg = alloc(sizeof(double) * (size_t)n);                                  \
        const double e = (double)(real)eps;                                                                        \
        for (int64_t j = 0; j < n; j++) tg[j] = RTOL * fabs(wg[j]);                                                \
        /* forward: y = x r w, r = 1 / sqrt(mean(x^2) + eps), in double from the inputs */                         \
        for (int64_t i = 0; i < rows; i++) {                                                                       \
            double ss = 0;                                                                                         \
            for (int64_t j = 0; j < n; j++) ss += (double)x[i * n + j] * x[i * n + j];                             \
            const double r = 1 / sqrt(ss / (double)n + e);                                                         \
            wr[i] = r, tr[i] = RTOL * r;                                                                           \
            for (int64_t j = 0; j < n; j++) {                                                                      \
                want[i * n + j] = x[i * n + j] * r * (w ? (double)w[j] : 1.0);                                     \
                tol[i * n + j] = RTOL * fabs(want[i * n + j]);                                                     \
            }                                                                                                      \
        }                                                                                                          \
        snprintf(what, sizeof what, "%s forward status", name);                                                    \
        if (rms_norm_forward_##SFX(y, rstd, x, w, eps, rows, n) != LORA_OK) fail(what);                            \
        expect_close_##SFX(name, "y", y, want, tol, N);                                                            \
        expect_close_##SFX(name, "rstd", rstd, wr, tr, rows);                                                      \
        /* backward, from the kernel's rstd r: gx = r (g w - xhat c), c = mean(g w xhat), xhat = x r;              \
         * gweight += sum over rows of g xhat */                                                                   \
        for (int64_t i = 0; i < rows; i++) {                                                                       \
            const double r = rstd[i];                                                                              \
            double c = 0, ca = 0;                                                                                  \
            for (int64_t j = 0; j < n; j++) {                                                                      \
                const double gh = g[i * n + j] * (w ? (double)w[j] : 1.0), xh = x[i * n + j] * r;                  \
                c += gh * xh, ca += fabs(gh * xh);                                                                 \
                wg[j] += g[i * n + j] * xh, tg[j] += RTOL * fabs(g[i * n + j] * xh);                               \
            }                                                                                                      \
            c /= (double)n, ca /= (double)n;                                                                       \
            for (int64_t j = 0; j < n; j++) {                                                                      \
                const double gh = g[i * n + j] * (w ? (double)w[j] : 1.0), xh = x[i * n + j] * r;                  \
                want[i * n + j] = r * (gh - xh * c);                                                               \
                tol[i * n + j] = RTOL * r * (fabs(gh) + fabs(xh) * ca);                                            \
            }                                                                                                      \
        }                                                                                                          \
        snprintf(what, sizeof what, "%s backward status", name);                                                   \
        if (rms_norm_backward_##SFX(gx, gw, g, x, w, rstd, rows, n) != LORA_OK) fail(what);                        \
        expect_close_##SFX(name, "gx", gx, want, tol, N);                                                          \
        expect_close_##SFX(name, "gweight", gw, wg, tg, n);                                                        \
        int st = rms_norm_backward_##SFX(gx1, NULL, g, x, w, rstd, rows, n);                                       \
        st |= rms_norm_backward_##SFX(NULL, gw1, g, x, w, rstd, rows, n);                                          \
        st |= rms_norm_backward_##SFX(NULL, NULL, g, x, w, rstd, rows, n);                                         \
        snprintf(what, sizeof what, "%s backward NULL outputs status", name);                                      \
        if (st != LORA_OK) fail(what);                                                                             \
        snprintf(what, sizeof what, "%s gx alone (gweight NULL)", name);                                           \
        if (memcmp(gx1, gx, sizeof(real) * (size_t)N) != 0) fail(what);                                            \
        snprintf(what, sizeof what, "%s gweight alone (gx NULL)", name);                                           \
        if (memcmp(gw1, gw, sizeof(real) * (size_t)n) != 0) fail(what);                                            \
        free(x), free(g), free(w), free(y), free(rstd), free(gx), free(gx1), free(gw), free(gw1);                  \
        free(want), free(tol), free(wr), free(tr), free(wg), free(tg);                                             \
    }                                                                                                              \
                                                                                                                   \
    /* rotary of x [B, H, T, D] in layout lx (attn_layout_of's kinds with g = 1: dense, the (B, T, H, D)           \
     * transpose, padded rows, reversed positions) into out in layout lo, forward and transpose, with              \
     * random cos / sin tables (their halves differ, unlike a rope table's). Pads of x are NaN (reading one        \
     * shows), out starts as NaN and its pads must stay NaN. */                                                    \
    static void check_rotary_##SFX(int64_t B, int64_t H, int64_t T, int64_t D, int lx, int lo)                     \
    {                                                                                                              \
        char name[128], what[192];                                                                                 \
        const attn_case c = {B, H, 1, T, T, D, 0, 0};                                                              \
        const attn_layout Lx = attn_layout_of(lx, &c), Lo = attn_layout_of(lo, &c);                                \
        const int64_t N = B * H * T * D, h = D / 2;                                                                \
        real *xd = random_##SFX(N, 2), *cs = random_##SFX(T * D, 1), *sn = random_##SFX(T * D, 1);                 \
        double *x64 = widen_##SFX(xd, N), *want = alloc(sizeof(double) * (size_t)N);                               \
        double *tol = alloc(sizeof(double) * (size_t)N);                                                           \
        real *x = attn_scatter_##SFX(x64, &Lx, &c, (real)NAN);                                                     \
        for (int transpose = 0; transpose < 2; transpose++) {                                                      \
            snprintf(name, sizeof name, #SFX " rotary B=%lld H=%lld T=%lld D=%lld layouts=%d%d transpose=%d",      \
                     (long long)B, (long long)H, (long long)T, (long long)D, lx, lo, transpose);                   \
            for (int64_t r = 0; r < B * H * T; r++) {                                                              \
                const double *xr = x64 + r * D;                                                                    \
                const int64_t t = r % T; /* rows in (B, H, T) order */                                             \
                double cc[2], ss[2];                                                                               \
                for (int64_t j = 0; j < h; j++) {                                                                  \
                    cc[0] = cs[t * D + j], cc[1] = cs[t * D + j + h];                                              \
                    ss[0] = sn[t * D + j], ss[1] = sn[t * D + j + h];                                              \
                    double a1, b1, a2, b2; /* y1 = a1 + b1, y2 = a2 + b2 */                                        \
                    if (!transpose)                                                                                \
                        a1 = xr[j] * cc[0], b1 = -xr[j + h] * ss[0], a2 = xr[j + h] * cc[1], b2 = xr[j] * ss[1];   \
                    else                                                                                           \
                        a1 = xr[j] * cc[0], b1 = xr[j + h] * ss[1], a2 = xr[j + h] * cc[1], b2 = -xr[j] * ss[0];   \
                    want[r * D + j] = a1 + b1, tol[r * D + j] = RTOL * (fabs(a1) + fabs(b1));                      \
                    want[r * D + j + h] = a2 + b2, tol[r * D + j + h] = RTOL * (fabs(a2) + fabs(b2));              \
                }                                                                                                  \
            }                                                                                                      \
            real *out = attn_nans_##SFX(Lo.n);                                                                     \
            snprintf(what, sizeof what, "%s status", name);                                                        \
            if (rotary_##SFX(out + Lo.base, x + Lx.base, cs, sn, transpose, B, H, T, D, Lx.s, Lo.s) != LORA_OK)    \
                fail(what);                                                                                        \
            int pads_ok = 1;                                                                                       \
            double *got = attn_gather_##SFX(out, &Lo, &c, &pads_ok);                                               \
            snprintf(what, sizeof what, "%s", name);                                                               \
            expect_close(what, got, want, tol, N);                                                                 \
            snprintf(what, sizeof what, "%s: a pad of out was written", name);                                     \
            if (!pads_ok) fail(what);                                                                              \
            if (transpose) { /* any non-zero transpose is the transpose */                                         \
                real *out2 = attn_nans_##SFX(Lo.n);                                                                \
                int st = rotary_##SFX(out2 + Lo.base, x + Lx.base, cs, sn, -7, B, H, T, D, Lx.s, Lo.s);            \
                snprintf(what, sizeof what, "%s: transpose=-7 differs from transpose=1", name);                    \
                int same = st == LORA_OK;                                                                          \
                for (int64_t i = 0; i < Lo.n; i++) same &= memcmp(out2 + i, out + i, sizeof(real)) == 0;           \
                if (!same) fail(what);                                                                             \
                free(out2);                                                                                        \
            }                                                                                                      \
            free(got), free(out);                                                                                  \
        }                                                                                                          \
        free(xd), free(cs), free(sn), free(x64), free(want), free(tol), free(x);                                   \
    }                                                                                                              \
                                                                                                                   \
    /* 1 and 2 threads: identical bits above the parallel threshold (1e5 elements): rms_norm over                  \
     * 401 x 257, rotary over (2, 4, 100, 130) from and into the (B, T, H, D) transpose. */                        \
    static void check_norm_rotary_threads_##SFX(void)                                                              \
    {                                                                                                              \
        const int64_t rows = 401, n = 257, N = rows * n;                                                           \
        const attn_case c = {2, 4, 1, 100, 100, 130, 0, 0};                                                        \
        const attn_layout L = attn_layout_of(1, &c);                                                               \
        real *x = random_##SFX(N, 3), *g = random_##SFX(N, 1), *w = random_##SFX(n, 1);                            \
        real *q = random_##SFX(L.n, 1), *cs = random_##SFX(100 * 130, 1), *sn = random_##SFX(100 * 130, 1);        \
        real *r[2][6];                                                                                             \
        const int64_t len[6] = {N, rows, N, n, L.n, L.n};                                                          \
        for (int t = 0; t < 2; t++) {                                                                              \
            lora_set_num_threads(t + 1);                                                                           \
            for (int k = 0; k < 6; k++) r[t][k] = alloc(sizeof(real) * (size_t)len[k]);                            \
            memset(r[t][3], 0, sizeof(real) * (size_t)n);                                                          \
            int st = rms_norm_forward_##SFX(r[t][0], r[t][1], x, w, 1e-6, rows, n);                                \
            st |= rms_norm_backward_##SFX(r[t][2], r[t][3], g, x, w, r[t][1], rows, n);                            \
            st |= rotary_##SFX(r[t][4], q, cs, sn, 0, c.B, c.Hkv, c.T, c.D, L.s, L.s);                             \
            st |= rotary_##SFX(r[t][5], q, cs, sn, 1, c.B, c.Hkv, c.T, c.D, L.s, L.s);                             \
            if (st != LORA_OK) fail(#SFX " rms_norm / rotary threads: status");                                    \
        }                                                                                                          \
        const char *names[6] = {"rms_norm y", "rms_norm rstd", "rms_norm gx", "rms_norm gweight", "rotary",        \
                                "rotary transpose"};                                                               \
        for (int k = 0; k < 6; k++) {                                                                              \
            char what[96];                                                                                         \
            snprintf(what, sizeof what, #SFX " %s", names[k]);                                                     \
            expect_equal(what, r[0][k], r[1][k], sizeof(real) * (size_t)len[k]);                                   \
            free(r[0][k]), free(r[1][k]);                                                                          \
        }                                                                                                          \
        lora_set_num_threads(0);                                                                                   \
        free(x), free(g), free(w), free(q), free(cs), free(sn);                                                    \
    }                                                                                                              \
                                                                                                                   \
    /* NULL pointers and bad sizes: LORA_EINVAL, and no output written. rows = 1, n = 4; B = H = T = 1, D = 4. */  \
    static void check_norm_rotary_errors_##SFX(void)                                                               \
    {                                                                                                              \
        real x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 2, 2}, cs[4] = {1, 0, 1, 0}, sn[4] = {0, 1, 0, 1}, r1[1] = {0.5};  \
        real y[4], rs[1], gx[4], gw[4], o[4];                                                                      \
        const int64_t s[3] = {4, 4, 4};                                                                            \
        for (int i = 0; i < 4; i++) y[i] = gx[i] = gw[i] = o[i] = 7;                                               \
        rs[0] = 7;                                                                                                 \
        struct {                                                                                                   \
            const char *what;                                                                                      \
            int status;                                                                                            \
        } calls[] = {                                                                                              \
            {"rms_norm_forward rows<0", rms_norm_forward_##SFX(y, rs, x, w, 1e-6, -1, 4)},                         \
            {"rms_norm_forward n=0", rms_norm_forward_##SFX(y, rs, x, w, 1e-6, 1, 0)},                             \
            {"rms_norm_forward n<0", rms_norm_forward_##SFX(y, rs, x, w, 1e-6, 1, -4)},                            \
            {"rms_norm_forward y=NULL", rms_norm_forward_##SFX(NULL, rs, x, w, 1e-6, 1, 4)},                       \
            {"rms_norm_forward rstd=NULL", rms_norm_forward_##SFX(y, NULL, x, w, 1e-6, 1, 4)},                     \
            {"rms_norm_forward x=NULL", rms_norm_forward_##SFX(y, rs, NULL, w, 1e-6, 1, 4)},                       \
            {"rms_norm_backward rows<0", rms_norm_backward_##SFX(gx, gw, x, x, w, r1, -1, 4)},                     \
            {"rms_norm_backward n=0", rms_norm_backward_##SFX(gx, gw, x, x, w, r1, 1, 0)},                         \
            {"rms_norm_backward n<0", rms_norm_backward_##SFX(gx, gw, x, x, w, r1, 1, -2)},                        \
            {"rms_norm_backward g=NULL", rms_norm_backward_##SFX(gx, gw, NULL, x, w, r1, 1, 4)},                   \
            {"rms_norm_backward x=NULL", rms_norm_backward_##SFX(gx, gw, x, NULL, w, r1, 1, 4)},                   \
            {"rms_norm_backward rstd=NULL", rms_norm_backward_##SFX(gx, gw, x, x, w, NULL, 1, 4)},                 \
            {"rms_norm_backward gweight only, x=NULL", rms_norm_backward_##SFX(NULL, gw, x, NULL, w, r1, 1, 4)},   \
            {"rotary B<0", rotary_##SFX(o, x, cs, sn, 0, -1, 1, 1, 4, s, s)},                                      \
            {"rotary H<0", rotary_##SFX(o, x, cs, sn, 0, 1, -1, 1, 4, s, s)},                                      \
            {"rotary T<0", rotary_##SFX(o, x, cs, sn, 1, 1, 1, -1, 4, s, s)},                                      \
            {"rotary D<0", rotary_##SFX(o, x, cs, sn, 0, 1, 1, 1, -4, s, s)},                                      \
            {"rotary D=3", rotary_##SFX(o, x, cs, sn, 0, 1, 1, 1, 3, s, s)},                                       \
            {"rotary D=1", rotary_##SFX(o, x, cs, sn, 1, 1, 1, 1, 1, s, s)},                                       \
            {"rotary out=NULL", rotary_##SFX(NULL, x, cs, sn, 0, 1, 1, 1, 4, s, s)},                               \
            {"rotary x=NULL", rotary_##SFX(o, NULL, cs, sn, 0, 1, 1, 1, 4, s, s)},                                 \
            {"rotary cos=NULL", rotary_##SFX(o, x, NULL, sn, 0, 1, 1, 1, 4, s, s)},                                \
            {"rotary sin=NULL", rotary_##SFX(o, x, cs, NULL, 0, 1, 1, 1, 4, s, s)},                                \
            {"rotary x_strides=NULL", rotary_##SFX(o, x, cs, sn, 0, 1, 1, 1, 4, NULL, s)},                         \
            {"rotary out_strides=NULL", rotary_##SFX(o, x, cs, sn, 1, 1, 1, 1, 4, s, NULL)},                       \
        };                                                                                                         \
        for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {                                              \
            char what[96];                                                                                         \
            snprintf(what, sizeof what, #SFX " %s -> LORA_EINVAL", calls[i].what);                                 \
            if (calls[i].status != LORA_EINVAL) fail(what);                                                        \
        }                                                                                                          \
        int touched = rs[0] != 7;                                                                                  \
        for (int i = 0; i < 4; i++) touched |= y[i] != 7 || gx[i] != 7 || gw[i] != 7 || o[i] != 7;                 \
        if (touched) fail(#SFX " rms_norm / rotary: a refused call wrote an output");                              \
        /* weight NULL is no weight, not an error; nothing asked of the backward: LORA_OK */                       \
        if (rms_norm_forward_##SFX(y, rs, x, NULL, 1e-6, 1, 4) != LORA_OK)                                         \
            fail(#SFX " rms_norm_forward with weight=NULL: LORA_OK");                                              \
        if (rms_norm_backward_##SFX(NULL, NULL, x, x, NULL, r1, 1, 4) != LORA_OK)                                  \
            fail(#SFX " rms_norm_backward with no output: LORA_OK");                                               \
    }

NORM_ROTARY_CHECKS(double, f64, 1e-12)
NORM_ROTARY_CHECKS(float, f32, 1e-5)

static void check_norm_rotary_all(void)
{
    static const int64_t ns[] = {1, 7, 9, 33, 577}, rows[] = {0, 1, 37};
    for (size_t a = 0; a < sizeof ns / sizeof ns[0]; a++)
        for (size_t b = 0; b < sizeof rows / sizeof rows[0]; b++)
            for (int weighted = 0; weighted < 2; weighted++) {
                const double eps = (a + b + (size_t)weighted) % 2 ? 1e-6 : 0.25;
                check_rms_norm_f64(rows[b], ns[a], weighted, 1, eps);
                check_rms_norm_f32(rows[b], ns[a], weighted, 1, eps);
            }
    /* magnitudes: large, tiny with eps dominating, tiny with eps = 0 (squares stay normal numbers) */
    check_rms_norm_f64(37, 33, 1, 1e140, 1e-6), check_rms_norm_f32(37, 33, 1, 1e12, 1e-6);
    check_rms_norm_f64(37, 33, 1, 1e-140, 1e-6), check_rms_norm_f32(37, 33, 1, 1e-12, 1e-6);
    check_rms_norm_f64(5, 9, 0, 1e-140, 0), check_rms_norm_f32(5, 9, 0, 1e-12, 0);

    static const int64_t Ds[] = {2, 6, 64, 130}, bht[][3] = {{1, 1, 1}, {2, 3, 5}, {1, 2, 37}};
    static const int layouts[][2] = {{0, 0}, {1, 1}, {1, 0}, {0, 1}, {2, 3}, {3, 2}};
    for (size_t d = 0; d < sizeof Ds / sizeof Ds[0]; d++)
        for (size_t s = 0; s < sizeof bht / sizeof bht[0]; s++)
            for (size_t l = 0; l < sizeof layouts / sizeof layouts[0]; l++) {
                check_rotary_f64(bht[s][0], bht[s][1], bht[s][2], Ds[d], layouts[l][0], layouts[l][1]);
                check_rotary_f32(bht[s][0], bht[s][1], bht[s][2], Ds[d], layouts[l][0], layouts[l][1]);
            }
    static const int64_t empty[][4] = {{0, 2, 3, 4}, {1, 0, 3, 4}, {2, 2, 0, 4}, {1, 2, 3, 0}};
    for (size_t e = 0; e < sizeof empty / sizeof empty[0]; e++)
        for (int l = 0; l < 4; l++) {
            check_rotary_f64(empty[e][0], empty[e][1], empty[e][2], empty[e][3], l, 3 - l);
            check_rotary_f32(empty[e][0], empty[e][1], empty[e][2], empty[e][3], l, 3 - l);
        }
    check_norm_rotary_threads_f64();
    check_norm_rotary_threads_f32();
    check_norm_rotary_errors_f64();
    check_norm_rotary_errors_f32();
}

int main(void)
{
    static const int64_t sizes[] = {0, 1, 2, 3, 4, 5, 7, 8, 9, 15, 16, 17, 33, 63, 65, 257, 1000};
    for (size_t c = 0; c < sizeof sizes / sizeof sizes[0]; c++) {
        for (int m = 0; m < 3; m++) {
            double mag = m == 0 ? 1 : m == 1 ? 20 : 100;
            check_silu_f64(sizes[c], mag);
            check_silu_f32(sizes[c], mag);
        }
    }
    /* rows, n, period, count0, group, scale: plain rows, causal blocks with heads, limits <= 0 and >= n. */
    static const struct {
        int64_t rows, n, period, count0, group;
        double scale;
    } rows[] = {
        {3, 0, 1, 0, 1, 1.0},    {0, 5, 1, 5, 1, 1.0},   {1, 1, 1, 1, 1, 1.0},    {5, 7, 1, 7, 1, -0.5},
        {9, 9, 9, 1, 1, 1.0},    {12, 33, 12, 30, 3, 1.0}, {14, 33, 7, -2, 2, 2.0}, {70, 257, 70, 200, 2, 1.0},
        {6, 17, 3, 40, 1, 0.25}, {8, 65, 8, -10, 1, 1.0}, {33, 63, 11, 1, 4, 0.0},  {2, 1000, 1, 1000, 1, 1.0},
    };
    for (size_t c = 0; c < sizeof rows / sizeof rows[0]; c++) {
        check_rows_f64(rows[c].rows, rows[c].n, rows[c].period, rows[c].count0, rows[c].group, rows[c].scale);
        check_rows_f32(rows[c].rows, rows[c].n, rows[c].period, rows[c].count0, rows[c].group, rows[c].scale);
    }
    check_f32_exp_edges();
    check_threads_f64(401, 257);
    check_threads_f32(401, 257);
    check_errors_f64();
    check_errors_f32();
    check_attention_all();
    check_norm_rotary_all();
    printf("%s (%d failures)\n", failures ? "FAILED" : "all step kernel checks passed", failures);
    return failures != 0;
}
