/* test_step_kernels.c: the fused step kernels (step_kernels.c) against plain scalar loops, in C alone.
 *
 * Built with -fsanitize=address by tests/test_step_kernels.py (and runnable by hand):
 *   cc -O1 -g -fsanitize=address -fopenmp -Icsrc csrc/test_step_kernels.c csrc/step_kernels.c \
 *      csrc/lora_kernels.c -o t -lm && ./t
 * (step_kernels.c calls lora_np_use_v3 and lora_get_num_threads from lora_kernels.c.)
 * The checks are written once over `real` in test_step_kernels_impl.h, instantiated below for float
 * and double (instantiate.h, as the library does), so reports and debuggers point at real lines;
 * the references and helpers they share are here, in double. main runs every check twice: on the
 * tiled, parallel functions, then on the plain _ref loops of lora_np.h (reports prefixed "ref ").
 * Every buffer is malloc'ed with exactly the bytes it holds (one byte for an empty one), so ASan
 * sees any read or write past an end: sizes n = 0, 1, 7, 9, 33, 257, ... around the SIMD widths
 * (4 and 8 floats, 2 and 4 doubles) and the padded tails. The references below use libm's exp
 * in double. Tolerance: float64 1e-12, float32 1e-5, relative to the magnitude of the terms plus,
 * for float32, a floor for the vector exp that returns 0 below FLT_MIN where libm gives a
 * denormal. Also: 1 and 2 threads give identical bits on sizes that go parallel, and NULL
 * pointers or bad sizes return LORA_EINVAL without touching anything. Exits non-zero on a failure.
 * attention_forward / attention_backward: against a scalar reference of the definition (grouped-query
 * heads, bottom-right causal mask, sliding windows, soft caps, rows that see no key), with q, out, dq, dout
 * in four layouts
 * (dense, the (B, T, Hq, D) transpose, padded rows, a negative position stride), every subset of
 * NULL gradient outputs (bit for bit the values of the full call), outputs that start as NaN (so that
 * one not written shows), T = 1, S = 1, T != S both ways, S, T or B = 0, D = 1, 17, 65; 1 and 2
 * threads bit for bit; LORA_EINVAL for bad sizes or NULL pointers, nothing written.
 * rms_norm_forward / rms_norm_backward: rows 0, 1, 37 of n = 1, 7, 9, 33, 577, with and without weight,
 * eps 0 to 0.25, magnitudes 1e+-12 (float) and 1e+-140 (double); gx alone and gweight alone (NULL for
 * the other) bit for bit the full call's, gweight accumulated onto its start. rotary, forward and
 * transpose: D = 2, 6, 64, 130 (and 0), rotated dims rd = D or fewer (partial rotary: 48 or 16 of 64, 4 of 7,
 * 0 of 6), B, H, T = 0 to 37, random tables whose halves differ, x and out in
 * the layouts above (dense, the (B, T, H, D) transpose, padded rows, reversed positions) passed with their
 * strides. Both: 1 and 2 threads bit for bit, LORA_EINVAL for bad sizes, odd D, NULL inputs.
 */
#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "lora_internal.h" /* CAT, for instantiate.h */
#include "lora_np.h"

static int failures = 0;
static const char *variant = ""; /* "ref " while main checks the _ref loops: a prefix to every report */
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
    printf("%s%s FAIL\n", variant, what);
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
        printf("%s%-44s FAIL at %lld: got %.9g want %.9g tol %.3g\n", variant, what, (long long)bad, got[bad], want[bad],
               tol[bad]);
    } else if (getenv("LORA_TEST_VERBOSE")) {
        printf("%s%-44s ok (worst %.2f of the tolerance)\n", variant, what, worst);
    }
}

static void expect_equal(const char *what, const void *a, const void *b, size_t bytes)
{
    if (memcmp(a, b, bytes) != 0) {
        failures++;
        printf("%s%-44s differs between 1 and 2 threads FAIL\n", variant, what);
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

/* ---- attention_forward / attention_backward --------------------------------------------------------
 * Grouped-query attention with q head hq = h * g + j on key/value head h. The reference works on dense
 * (B, Hq, T, D) copies of q, dout (and gives out, dq in that order), dense (B, Hkv, S, D) k, v, dk, dv
 * and (B, Hkv, T, g) lse, in double, from the definition: scores s = scale q.k (scale rounded to the
 * element type, as the kernel does; with a soft cap c, c tanh(s / c)), causal: query t sees keys
 * s <= t + S - T, with a window W only keys s > t + S - T - W, P = softmax over those,
 * out = P v, lse = log-sum-exp of the visible scores (+inf, with out = 0 and dq = 0, when none is),
 * delta = dout.out, dS = P (dout.v - delta) (times 1 - tanh^2 with a cap), dq = scale dS k,
 * dk = scale dS^T q, dv = P^T dout.
 * Tolerance, first order in RTOL (the differences of rounding, relative to the magnitude of the terms):
 * a score may be off by RTOL * A with A = |scale| |q|.|k|; so P by P * rP, rP = RTOL (3 + A + max A +
 * |lse|), giving Pt = P (RTOL + rP) + FLOOR; out by Pt.|v|; delta, dS, dq, dk, dv likewise (the same
 * propagation as tests/test_attention_kernel.py). A cap c turns A into (1 - t^2) (A + |s|) + 2 |c t| (the
 * raw score's error through tanh, plus the division's and tanh's own), and dS's factor 1 - t^2 is off by
 * 2 |t| RTOL A / |c| + 2 RTOL (kept beside the error of P (dP - delta): a saturated cap's 1 - t^2 is about
 * its own error). */

typedef struct {
    int64_t B, Hkv, g, T, S, D;
    int causal;
    double scale;
    int64_t window; /* 0: none */
    double softcap; /* 0: none */
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

/* The keys [*lo, return) query t sees: s <= t + S - T when causal, s > t + S - T - window with a window. */
static int64_t attn_visible(const attn_case *c, int64_t t, int64_t *lo)
{
    int64_t n = c->causal ? t + 1 + c->S - c->T : c->S, l = c->window ? t + 1 + c->S - c->T - c->window : 0;
    n = n < 0 ? 0 : n > c->S ? c->S : n;
    *lo = l < 0 ? 0 : l > n ? n : l;
    return n;
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
    double *dcap = alloc(sizeof(double) * (size_t)S), *dcapt = alloc(sizeof(double) * (size_t)S);
    for (int w = 0; w < 5; w++) {
        int64_t n = w == 1 ? B * Hkv * T * g : w >= 3 ? B * Hkv * S * D : B * Hq * T * D;
        for (int64_t i = 0; i < n; i++) want[w][i] = 0, tol[w][i] = 0;
    }
    for (int64_t b = 0; b < B; b++)
        for (int64_t hq = 0; hq < Hq; hq++)
            for (int64_t t = 0; t < T; t++) {
                const int64_t h = hq / g, row = ((b * Hq + hq) * T + t) * D, kv = (b * Hkv + h) * S * D;
                int64_t lo;
                const int64_t li = ((b * Hkv + h) * T + t) * g + hq % g, vis = attn_visible(c, t, &lo);
                const double *qr = q + row, *dor = dout + row;
                double *o = want[0] + row, *ot = tol[0] + row, *dq = want[2] + row, *dqt = tol[2] + row;
                if (vis == lo) { /* no key: out = 0, dq = 0, lse = +inf */
                    want[1][li] = INFINITY;
                    for (int64_t e = 0; e < D; e++) ot[e] = dqt[e] = floor_;
                    continue;
                }
                double m = -INFINITY, Amax = 0, sum = 0;
                for (int64_t s = lo; s < vis; s++) {
                    double acc = 0, mag = 0;
                    for (int64_t e = 0; e < D; e++) acc += qr[e] * k[kv + s * D + e], mag += fabs(qr[e] * k[kv + s * D + e]);
                    sc[s] = scale * acc, A[s] = fabs(scale) * mag, dcap[s] = 1, dcapt[s] = 0;
                    if (c->softcap) { /* sc = cap tanh(raw / cap): raw's error through 1 - t^2, the division, tanh */
                        const double t = tanh(sc[s] / c->softcap);
                        A[s] = (1 - t * t) * (A[s] + fabs(sc[s])) + 2 * fabs(c->softcap * t);
                        sc[s] = c->softcap * t, dcap[s] = 1 - t * t;
                        dcapt[s] = 2 * fabs(t) * rtol * A[s] / c->softcap + 2 * rtol;
                    }
                    m = fmax(m, sc[s]), Amax = fmax(Amax, A[s]);
                }
                for (int64_t s = lo; s < vis; s++) sum += exp(sc[s] - m);
                const double lse = m + log(sum);
                want[1][li] = lse;
                tol[1][li] = rtol * (fabs(m) + fabs(lse - m) + Amax) + floor_;
                for (int64_t s = lo; s < vis; s++) {
                    P[s] = exp(sc[s] - lse);
                    Pt[s] = P[s] * (rtol + rtol * (3 + A[s] + Amax + fabs(lse))) + floor_;
                }
                double delta = 0, dmag = 0, dtol = 0;
                for (int64_t e = 0; e < D; e++) {
                    double acc = 0, at = 0;
                    for (int64_t s = lo; s < vis; s++) acc += P[s] * v[kv + s * D + e], at += Pt[s] * fabs(v[kv + s * D + e]);
                    o[e] = acc, ot[e] = at;
                }
                for (int64_t e = 0; e < D; e++) delta += dor[e] * o[e], dmag += fabs(dor[e] * o[e]), dtol += fabs(dor[e]) * ot[e];
                dtol += rtol * dmag;
                for (int64_t s = lo; s < vis; s++) {
                    double acc = 0, mag = 0;
                    for (int64_t e = 0; e < D; e++) acc += dor[e] * v[kv + s * D + e], mag += fabs(dor[e] * v[kv + s * D + e]);
                    dP[s] = acc, G[s] = mag;
                }
                for (int64_t s = lo; s < vis; s++) { /* dS through the cap: * (1 - t^2) */
                    const double dS0 = P[s] * (dP[s] - delta), dS = dS0 * dcap[s];
                    const double dSt = (Pt[s] * fabs(dP[s] - delta) + P[s] * (rtol * G[s] + dtol) + rtol * fabs(dS0)) *
                                       (dcap[s] + dcapt[s]) + fabs(dS0) * dcapt[s];
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
    free(sc), free(A), free(P), free(Pt), free(dP), free(G), free(dcap), free(dcapt);
}

#define STR_(x) #x
#define STR(x) STR_(x) /* "f32" or "f64" */

#define TEMPLATE "test_step_kernels_impl.h" /* check_silu_f32, check_silu_f64, ... */
#include "instantiate.h"

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
    if (impl_f32->exp_rows(x, lse, 1, N, 1, N, 1) != LORA_OK) fail("f32 exp edges status");
    double *got = widen_f32(x, N);
    expect_close("f32 vector exp edges (2 ulp)", got, want, tol, N);
    free(got), free(x), free(lse), free(want), free(tol);
}

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
    {{1, 1, 2, 10, 600, 17, 1, 0.2}, 1302, 2}, /* 600 keys, D = 17: the products' last columns take their
                                                  packed B from malloc (over 4096 reals) */
    {{1, 2, 2, 6, 9, 16, 0, 0.25}, 1100, 30},  /* scores in the hundreds: near one-hot rows */
    {{1, 1, 2, 9, 6, 8, 1, 0.25}, 1212, 30},
    {{1, 1, 2, 3, 0, 4, 1, 0.5}, 1111, 1},     /* S = 0: no key at all */
    {{1, 1, 2, 3, 0, 4, 0, 0.5}, 2222, 1},
    {{1, 2, 2, 0, 5, 4, 1, 0.5}, 1111, 1},     /* T = 0 */
    {{0, 2, 2, 3, 5, 4, 1, 0.5}, 1111, 1},     /* B = 0 */
    /* sliding windows (keys s > t + S - T - window) and soft caps (scores cap tanh(s / cap)) */
    {{1, 1, 1, 9, 9, 4, 1, 0.5, 1}, 1111, 1},             /* window 1: each row sees itself only */
    {{2, 2, 3, 70, 70, 17, 1, 0.3, 5}, 1021, 2},          /* window 5 in blocks of 16: edge blocks masked */
    {{1, 1, 1, 130, 130, 16, 1, 0.25, 20}, 3012, 2},      /* windows skip whole key blocks */
    {{1, 2, 2, 20, 45, 8, 1, 0.4, 7}, 2301, 2},           /* T < S with the cache's alignment */
    {{1, 1, 2, 9, 4, 8, 1, 0.4, 3}, 1212, 2},             /* T > S: blind rows and a window */
    {{1, 1, 2, 12, 30, 8, 0, 0.4, 6}, 1100, 2},           /* non-causal: only the lower edge */
    {{1, 1, 1, 60, 10, 8, 0, 0.4, 3}, 2222, 2},           /* non-causal T > S: late rows see no key */
    {{1, 1, 2, 12, 12, 8, 1, 0.4, 100}, 1111, 2},         /* a window wider than the sequence */
    {{1, 2, 3, 50, 61, 16, 0, 0.7, 0, 2.5}, 1230, 2},     /* soft cap */
    {{2, 1, 2, 33, 33, 17, 1, 0.5, 0, 0.5}, 3333, 30},    /* a tight cap on scores in the hundreds */
    {{1, 2, 2, 70, 70, 16, 1, 0.3, 9, 4.0}, 1021, 2},     /* window and cap together */
    {{1, 1, 2, 9, 6, 8, 1, 0.25, 2, 1.0}, 2130, 30},
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

    /* D and the rotated dims rd: full (rd = D), partial (Phi-3's 3/4, GPT-NeoX's 1/4), none (rd = 0) */
    static const int64_t Ds[][2] = {{2, 2}, {6, 6}, {64, 64}, {130, 130}, {64, 48}, {64, 16}, {7, 4}, {6, 0}};
    static const int64_t bht[][3] = {{1, 1, 1}, {2, 3, 5}, {1, 2, 37}};
    static const int layouts[][2] = {{0, 0}, {1, 1}, {1, 0}, {0, 1}, {2, 3}, {3, 2}};
    for (size_t d = 0; d < sizeof Ds / sizeof Ds[0]; d++)
        for (size_t s = 0; s < sizeof bht / sizeof bht[0]; s++)
            for (size_t l = 0; l < sizeof layouts / sizeof layouts[0]; l++) {
                check_rotary_f64(bht[s][0], bht[s][1], bht[s][2], Ds[d][0], Ds[d][1], layouts[l][0], layouts[l][1]);
                check_rotary_f32(bht[s][0], bht[s][1], bht[s][2], Ds[d][0], Ds[d][1], layouts[l][0], layouts[l][1]);
            }
    static const int64_t empty[][4] = {{0, 2, 3, 4}, {1, 0, 3, 4}, {2, 2, 0, 4}, {1, 2, 3, 0}};
    for (size_t e = 0; e < sizeof empty / sizeof empty[0]; e++)
        for (int l = 0; l < 4; l++) {
            check_rotary_f64(empty[e][0], empty[e][1], empty[e][2], empty[e][3], empty[e][3], l, 3 - l);
            check_rotary_f32(empty[e][0], empty[e][1], empty[e][2], empty[e][3], empty[e][3], l, 3 - l);
        }
    check_norm_rotary_threads_f64();
    check_norm_rotary_threads_f32();
    check_norm_rotary_errors_f64();
    check_norm_rotary_errors_f32();
}

/* Every check, on the functions impl_f32 and impl_f64 point at. */
static void check_all(void)
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
}

int main(void)
{
    check_all(); /* the tiled, parallel functions */
    variant = "ref ";
    impl_f32 = &plain_f32, impl_f64 = &plain_f64;
    check_all(); /* the _ref loops, against the same references and tolerances */
    printf("%s (%d failures)\n", failures ? "FAILED" : "all step kernel checks passed", failures);
    return failures != 0;
}
