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
    printf("%s (%d failures)\n", failures ? "FAILED" : "all step kernel checks passed", failures);
    return failures != 0;
}
