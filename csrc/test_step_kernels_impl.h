/* test_step_kernels_impl.h: the checks of test_step_kernels.c for one element type, written once over
 * `real`: test_step_kernels.c instantiates it (instantiate.h) as float (FN(name) = name_f32) and as double
 * (name_f64). RTOL is the relative tolerance of the element type; FLOOR the absolute one that covers
 * float32's vector exp returning 0 below FLT_MIN where libm gives a denormal. */
#if IS_F32
#define RTOL 1e-5
#define FLOOR (4 * (double)FLT_MIN)
#else
#define RTOL 1e-12
#define FLOOR (4 * DBL_MIN)
#endif

/* The functions under test: the tiled, parallel ones (FN(tiled)) or the plain _ref loops (FN(plain)).
 * main runs every check with FN(impl) at each, against the same double references. */
#define KERNEL(name) __typeof__(FN(name)) *name
typedef struct {
    KERNEL(silu_mul_forward);
    KERNEL(silu_mul_backward);
    KERNEL(softmax_rows);
    KERNEL(exp_rows);
    KERNEL(attention_forward);
    KERNEL(attention_backward);
    KERNEL(rms_norm_forward);
    KERNEL(rms_norm_backward);
    KERNEL(rotary);
} FN(kernels);
#undef KERNEL
static const FN(kernels) FN(tiled) = {FN(silu_mul_forward), FN(silu_mul_backward), FN(softmax_rows),
                                      FN(exp_rows), FN(attention_forward), FN(attention_backward),
                                      FN(rms_norm_forward), FN(rms_norm_backward), FN(rotary)};
static const FN(kernels) FN(plain) = {FN(silu_mul_forward_ref), FN(silu_mul_backward_ref), FN(softmax_rows_ref),
                                      FN(exp_rows_ref), FN(attention_forward_ref), FN(attention_backward_ref),
                                      FN(rms_norm_forward_ref), FN(rms_norm_backward_ref), FN(rotary_ref)};
static const FN(kernels) *FN(impl) = &FN(tiled);

/* ---- silu_mul, softmax_rows, exp_rows --------------------------------------------------------------- */

static real *FN(random)(int64_t n, double mag)
{
    real *a = alloc(sizeof(real) * (size_t)n);
    for (int64_t i = 0; i < n; i++) a[i] = (real)(mag * uniform());
    return a;
}
static double *FN(widen)(const real *a, int64_t n)
{
    double *d = alloc(sizeof(double) * (size_t)n);
    for (int64_t i = 0; i < n; i++) d[i] = a[i];
    return d;
}
/* a (n elements) widened, against want within tol, reported as "<name> <label>" */
static void FN(expect_close)(const char *name, const char *label, const real *a, const double *want,
                             const double *tol, int64_t n)
{
    char what[200];
    double *got = FN(widen)(a, n);
    snprintf(what, sizeof what, "%s %s", name, label);
    expect_close(what, got, want, tol, n);
    free(got);
}

/* silu_mul_forward / _backward on n elements; the sigmoid may differ by ds = RTOL * s + FLOOR. */
static void FN(check_silu)(int64_t n, double mag)
{
    char what[128];
    real *a = FN(random)(n, mag), *b = FN(random)(n, 3), *g = FN(random)(n, 3);
    real *out = alloc(sizeof(real) * (size_t)n), *ga = alloc(sizeof(real) * (size_t)n);
    real *gb = alloc(sizeof(real) * (size_t)n), *gb_only = alloc(sizeof(real) * (size_t)n);
    double *want = alloc(sizeof(double) * (size_t)(3 * n)), *tol = alloc(sizeof(double) * (size_t)(3 * n));
    if (n > 2) a[0] = 0, a[1] = (real)-88.5, a[2] = (real)95; /* exp(-a) at 0, overflowing, underflowing */
    for (int64_t i = 0; i < n; i++) {
        double A = a[i], B = b[i], G = g[i], s = sigmoid(A), ds = RTOL * s + FLOOR;
        want[i] = s * A * B;
        tol[i] = RTOL * fabs(want[i]) + fabs(A * B) * ds;
        want[n + i] = ((1 - s) * A + 1) * s * B * G;
        tol[n + i] = RTOL * fabs(G * B) * s * (1 + fabs((1 - s) * A)) + fabs(G * B) * (1 + fabs(A)) * ds;
        want[2 * n + i] = s * A * G;
        tol[2 * n + i] = RTOL * fabs(want[2 * n + i]) + fabs(A * G) * ds;
    }
    int st = FN(impl)->silu_mul_forward(out, a, b, n);
    st |= FN(impl)->silu_mul_backward(ga, gb, g, a, b, n);
    st |= FN(impl)->silu_mul_backward(NULL, gb_only, g, a, NULL, n); /* b may be NULL without ga */
    st |= FN(impl)->silu_mul_backward(NULL, NULL, g, a, NULL, n);    /* nothing asked: nothing done */
    snprintf(what, sizeof what, STR(SFX) " silu_mul n=%lld status", (long long)n);
    if (st != LORA_OK) fail(what);
    double *got[] = {FN(widen)(out, n), FN(widen)(ga, n), FN(widen)(gb, n)};
    const char *names[] = {"forward", "backward ga", "backward gb"};
    for (int k = 0; k < 3; k++) {
        snprintf(what, sizeof what, STR(SFX) " silu_mul %s n=%lld", names[k], (long long)n);
        expect_close(what, got[k], want + k * n, tol + k * n, n);
        free(got[k]);
    }
    snprintf(what, sizeof what, STR(SFX) " silu_mul gb alone n=%lld", (long long)n);
    if (memcmp(gb, gb_only, sizeof(real) * (size_t)n) != 0) fail(what);
    free(a), free(b), free(g), free(out), free(ga), free(gb), free(gb_only), free(want), free(tol);
}

/* softmax_rows then exp_rows on p [rows, n] with some -inf entries and whole -inf rows. */
static void FN(check_rows)(int64_t rows, int64_t n, int64_t period, int64_t count0, int64_t group,
                           double scale)
{
    char what[160];
    const int64_t N = rows * n;
    real *p = FN(random)(N, 100), *lse = alloc(sizeof(real) * (size_t)rows);
    for (int64_t i = 0; i < N; i++)
        if (uniform() > 0.8) p[i] = -INFINITY;
    for (int64_t i = 1; i < rows; i += 5)
        for (int64_t j = 0; j < n; j++) p[i * n + j] = -INFINITY;
    double *p0 = FN(widen)(p, N), *want = alloc(sizeof(double) * (size_t)N);
    double *tol = alloc(sizeof(double) * (size_t)N), *wlse = alloc(sizeof(double) * (size_t)rows);
    double *tlse = alloc(sizeof(double) * (size_t)rows);
    for (int64_t i = 0; i < rows; i++) {
        double m;
        softmax_ref(want + i * n, wlse + i, &m, p0 + i * n, (real)scale, vis_of(i, n, period, count0, group),
                    n, sizeof(real) == 4);
        tlse[i] = RTOL * (fabs(m) + fabs(wlse[i] - m)) + FLOOR;
        for (int64_t j = 0; j < n; j++) tol[i * n + j] = RTOL * fabs(want[i * n + j]) + FLOOR * (1 + fabs(scale));
    }
    snprintf(what, sizeof what, STR(SFX) " softmax_rows %lldx%lld period=%lld count0=%lld group=%lld",
             (long long)rows, (long long)n, (long long)period, (long long)count0, (long long)group);
    if (FN(impl)->softmax_rows(p, lse, scale, rows, n, period, count0, group) != LORA_OK) fail(what);
    double *got = FN(widen)(p, N), *glse = FN(widen)(lse, rows);
    expect_close(what, got, want, tol, N);
    strcat(what, " lse");
    expect_close(what, glse, wlse, tlse, rows);
    free(got), free(glse);
    /* exp_rows on the original scores with the (float-rounded) log-sum-exps: the probabilities again,
     * without the scale; a row with lse = +inf is all 0. */
    real *q = alloc(sizeof(real) * (size_t)N);
    for (int64_t i = 0; i < N; i++) q[i] = (real)p0[i];
    for (int64_t i = 0; i < rows; i++) {
        int64_t vis = isinf(lse[i]) && lse[i] > 0 ? 0 : vis_of(i, n, period, count0, group);
        for (int64_t j = 0; j < n; j++) {
            double e = j < vis ? exp((double)(real)(q[i * n + j] - lse[i])) : 0;
            want[i * n + j] = e;
            tol[i * n + j] = RTOL * e + FLOOR;
        }
    }
    snprintf(what, sizeof what, STR(SFX) " exp_rows %lldx%lld period=%lld count0=%lld group=%lld",
             (long long)rows, (long long)n, (long long)period, (long long)count0, (long long)group);
    if (FN(impl)->exp_rows(q, lse, rows, n, period, count0, group) != LORA_OK) fail(what);
    got = FN(widen)(q, N);
    expect_close(what, got, want, tol, N);
    free(got), free(q), free(p), free(lse), free(p0), free(want), free(tol), free(wlse), free(tlse);
}

/* 1 and 2 threads: identical bits, on sizes above the kernels' parallel threshold (1e5 elements). */
static void FN(check_threads)(int64_t rows, int64_t n)
{
    char what[96];
    const int64_t N = rows * n;
    real *p0 = FN(random)(N, 30), *g = FN(random)(N, 1), *b = FN(random)(N, 1);
    real *r[2][5];
    for (int t = 0; t < 2; t++) {
        lora_set_num_threads(t + 1);
        for (int k = 0; k < 5; k++) r[t][k] = alloc(sizeof(real) * (size_t)N);
        real *lse = alloc(sizeof(real) * (size_t)rows);
        memcpy(r[t][0], p0, sizeof(real) * (size_t)N);
        memcpy(r[t][1], p0, sizeof(real) * (size_t)N);
        int st = FN(impl)->softmax_rows(r[t][0], lse, 0.5, rows, n, 7, n / 2, 2);
        st |= FN(impl)->exp_rows(r[t][1], lse, rows, n, 7, n / 2, 2);
        st |= FN(impl)->silu_mul_forward(r[t][2], p0, b, N);
        st |= FN(impl)->silu_mul_backward(r[t][3], r[t][4], g, p0, b, N);
        if (st != LORA_OK) fail(STR(SFX) " threads: status");
        free(lse);
    }
    const char *names[] = {"softmax_rows", "exp_rows", "silu_mul_forward", "silu_mul_backward ga",
                           "silu_mul_backward gb"};
    for (int k = 0; k < 5; k++) {
        snprintf(what, sizeof what, STR(SFX) " %s %lldx%lld", names[k], (long long)rows, (long long)n);
        expect_equal(what, r[0][k], r[1][k], sizeof(real) * (size_t)N);
        free(r[0][k]), free(r[1][k]);
    }
    lora_set_num_threads(0);
    free(p0), free(g), free(b);
}

/* NULL pointers and bad sizes: LORA_EINVAL, and no element written. */
static void FN(check_errors)(void)
{
    real x[3] = {1, 2, 3}, y[3] = {4, 5, 6}, o[3] = {7, 8, 9}, l[1] = {10};
    const real o0[3] = {7, 8, 9};
    struct {
        const char *what;
        int status;
    } calls[] = {
        {"silu_mul_forward out=NULL", FN(impl)->silu_mul_forward(NULL, x, y, 3)},
        {"silu_mul_forward a=NULL", FN(impl)->silu_mul_forward(o, NULL, y, 3)},
        {"silu_mul_forward b=NULL", FN(impl)->silu_mul_forward(o, x, NULL, 3)},
        {"silu_mul_forward n<0", FN(impl)->silu_mul_forward(o, x, y, -1)},
        {"silu_mul_backward g=NULL", FN(impl)->silu_mul_backward(o, NULL, NULL, x, y, 3)},
        {"silu_mul_backward a=NULL", FN(impl)->silu_mul_backward(o, NULL, x, NULL, y, 3)},
        {"silu_mul_backward ga without b", FN(impl)->silu_mul_backward(o, NULL, x, y, NULL, 3)},
        {"silu_mul_backward n<0", FN(impl)->silu_mul_backward(NULL, o, x, y, y, -3)},
        {"softmax_rows p=NULL", FN(impl)->softmax_rows(NULL, l, 1.0, 1, 3, 1, 3, 1)},
        {"softmax_rows lse=NULL", FN(impl)->softmax_rows(o, NULL, 1.0, 1, 3, 1, 3, 1)},
        {"softmax_rows period=0", FN(impl)->softmax_rows(o, l, 1.0, 1, 3, 0, 3, 1)},
        {"softmax_rows group=0", FN(impl)->softmax_rows(o, l, 1.0, 1, 3, 1, 3, 0)},
        {"softmax_rows rows<0", FN(impl)->softmax_rows(o, l, 1.0, -1, 3, 1, 3, 1)},
        {"softmax_rows n<0", FN(impl)->softmax_rows(o, l, 1.0, 1, -3, 1, 3, 1)},
        {"exp_rows p=NULL", FN(impl)->exp_rows(NULL, l, 1, 3, 1, 3, 1)},
        {"exp_rows lse=NULL", FN(impl)->exp_rows(o, NULL, 1, 3, 1, 3, 1)},
        {"exp_rows period=0", FN(impl)->exp_rows(o, l, 1, 3, 0, 3, 1)},
        {"exp_rows group=-1", FN(impl)->exp_rows(o, l, 1, 3, 1, 3, -1)},
        {"exp_rows rows<0", FN(impl)->exp_rows(o, l, -2, 3, 1, 3, 1)},
    };
    for (size_t c = 0; c < sizeof calls / sizeof calls[0]; c++) {
        char what[96];
        snprintf(what, sizeof what, STR(SFX) " %s -> LORA_EINVAL", calls[c].what);
        if (calls[c].status != LORA_EINVAL) fail(what);
    }
    if (memcmp(o, o0, sizeof o) != 0 || l[0] != 10) fail(STR(SFX) " a refused call wrote its output");
    if (FN(impl)->silu_mul_backward(NULL, NULL, x, y, NULL, 3) != LORA_OK) fail(STR(SFX) " no output asked: LORA_OK");
}

/* ---- attention_forward / attention_backward (the reference and its tolerance: test_step_kernels.c) ---- */

/* A (B, Hq, T, D) array in a layout: the values of dense (canonical order) at the kept elements, pad
 * elsewhere. */
static real *FN(attn_scatter)(const double *dense, const attn_layout *l, const attn_case *c, real pad)
{
    real *a = alloc(sizeof(real) * (size_t)l->n);
    for (int64_t i = 0; i < l->n; i++) a[i] = pad;
    for (int64_t b = 0, i = 0; b < c->B; b++)
        for (int64_t hq = 0; hq < c->Hkv * c->g; hq++)
            for (int64_t t = 0; t < c->T; t++)
                for (int64_t e = 0; e < c->D; e++, i++) a[attn_index(l, c, b, hq, t, e)] = (real)dense[i];
    return a;
}
/* The kept elements in canonical (B, Hq, T, D) order; 1 in *pads_ok unless a pad lost its NaN. */
static double *FN(attn_gather)(const real *a, const attn_layout *l, const attn_case *c, int *pads_ok)
{
    double *d = alloc(sizeof(double) * (size_t)(c->B * c->Hkv * c->g * c->T * c->D));
    for (int64_t b = 0, i = 0; b < c->B; b++)
        for (int64_t hq = 0; hq < c->Hkv * c->g; hq++)
            for (int64_t t = 0; t < c->T; t++)
                for (int64_t e = 0; e < c->D; e++, i++) d[i] = a[attn_index(l, c, b, hq, t, e)];
    char *m = attn_mask(l, c);
    for (int64_t i = 0; i < l->n; i++)
        if (!m[i] && a[i] == a[i]) *pads_ok = 0;
    free(m);
    return d;
}
static real *FN(attn_nans)(int64_t n)
{
    real *a = alloc(sizeof(real) * (size_t)n);
    for (int64_t i = 0; i < n; i++) a[i] = (real)NAN;
    return a;
}

/* Forward, then backward with every combination of NULL gradient outputs, against attention_ref.
 * Layouts of q, out, dq, dout: the four digits of `layouts`. Every output starts as NaN (so an element
 * not written, or a gradient accumulated instead of overwritten, shows), pads of out and dq must stay NaN,
 * pads of q and dout are NaN (reading one would show). */
static void FN(check_attention)(attn_case c, int layouts, double mag)
{
    char what[200], name[160];
    const int64_t Hq = c.Hkv * c.g, NQ = c.B * Hq * c.T * c.D, NK = c.B * c.Hkv * c.S * c.D;
    const int64_t NL = c.B * c.Hkv * c.T * c.g;
    const attn_layout lq = attn_layout_of(layouts / 1000 % 10, &c), lo = attn_layout_of(layouts / 100 % 10, &c);
    const attn_layout ld = attn_layout_of(layouts / 10 % 10, &c), lg = attn_layout_of(layouts % 10, &c);
    snprintf(name, sizeof name, STR(SFX) " attention B=%lld Hkv=%lld g=%lld T=%lld S=%lld D=%lld causal=%d "
             "window=%lld softcap=%g layouts=%04d",
             (long long)c.B, (long long)c.Hkv, (long long)c.g, (long long)c.T, (long long)c.S, (long long)c.D,
             c.causal, (long long)c.window, c.softcap, layouts);
    /* Inputs, rounded to real, then widened for the reference. */
    real *qd = FN(random)(NQ, mag), *gd = FN(random)(NQ, 1);
    real *k = FN(random)(NK, mag), *v = FN(random)(NK, 1);
    double *q64 = FN(widen)(qd, NQ), *g64 = FN(widen)(gd, NQ), *k64 = FN(widen)(k, NK);
    double *v64 = FN(widen)(v, NK);
    real *q = FN(attn_scatter)(q64, &lq, &c, (real)NAN), *dout = FN(attn_scatter)(g64, &lg, &c, (real)NAN);
    double *want[5], *tol[5];
    const int64_t sizes[5] = {NQ, NL, NQ, NK, NK};
    for (int w = 0; w < 5; w++)
        want[w] = alloc(sizeof(double) * (size_t)sizes[w]), tol[w] = alloc(sizeof(double) * (size_t)sizes[w]);
    attention_ref(want, tol, &c, q64, k64, v64, g64, (double)(real)c.scale, RTOL, FLOOR);

    real *out = FN(attn_nans)(lo.n), *lse = FN(attn_nans)(NL);
    int st = FN(impl)->attention_forward(out + lo.base, lse, q + lq.base, k, v, c.scale, c.causal, c.softcap,
                                         c.window, c.B, c.Hkv, c.g, c.T, c.S, c.D, lq.s, lo.s);
    snprintf(what, sizeof what, "%s forward status", name);
    if (st != LORA_OK) fail(what);
    int pads_ok = 1;
    double *got = FN(attn_gather)(out, &lo, &c, &pads_ok);
    snprintf(what, sizeof what, "%s out", name);
    expect_close(what, got, want[0], tol[0], NQ);
    free(got);
    got = FN(widen)(lse, NL);
    snprintf(what, sizeof what, "%s lse", name);
    expect_close(what, got, want[1], tol[1], NL);
    free(got);

    real *full[3] = {NULL, NULL, NULL};
    const int64_t glen[3] = {ld.n, NK, NK};
    for (int need = 7; need >= 0; need--) { /* bit 4: dq, 2: dk, 1: dv; 7 first, the others against it */
        real *gr[3];
        for (int w = 0; w < 3; w++) gr[w] = need & (4 >> w) ? FN(attn_nans)(glen[w]) : NULL;
        st = FN(impl)->attention_backward(gr[0] ? gr[0] + ld.base : NULL, gr[1], gr[2], dout + lg.base,
                                          q + lq.base, k, v, out + lo.base, lse, c.scale, c.causal, c.softcap,
                                          c.window, c.B, c.Hkv, c.g, c.T, c.S, c.D, ld.s, lg.s, lq.s, lo.s);
        snprintf(what, sizeof what, "%s backward need=%d status", name, need);
        if (st != LORA_OK) fail(what);
        if (need == 7) {
            const char *names[3] = {"dq", "dk", "dv"};
            for (int w = 0; w < 3; w++) {
                got = w == 0 ? FN(attn_gather)(gr[0], &ld, &c, &pads_ok) : FN(widen)(gr[w], NK);
                snprintf(what, sizeof what, "%s %s", name, names[w]);
                expect_close(what, got, want[2 + w], tol[2 + w], sizes[2 + w]);
                free(got);
                full[w] = gr[w];
            }
            continue;
        }
        for (int w = 0; w < 3; w++) {
            if (!gr[w]) continue;
            snprintf(what, sizeof what, "%s need=%d %s alone", name, need, w == 0 ? "dq" : w == 1 ? "dk" : "dv");
            int same = 1;
            for (int64_t i = 0; i < glen[w]; i++) /* NaN pads compare as equal */
                same &= memcmp(gr[w] + i, full[w] + i, sizeof(real)) == 0;
            if (!same) {
                failures++;
                printf("%-44s differs from the call with all three FAIL\n", what);
            }
            free(gr[w]);
        }
    }
    snprintf(what, sizeof what, "%s: a pad of out or dq was written", name);
    if (!pads_ok) fail(what);
    for (int w = 0; w < 3; w++) free(full[w]);
    for (int w = 0; w < 5; w++) free(want[w]), free(tol[w]);
    free(qd), free(gd), free(k), free(v), free(q64), free(g64), free(k64), free(v64), free(q), free(dout);
    free(out), free(lse);
}

/* 1 and 2 threads: identical bits (B * Hkv = 6 tasks, far above the parallel threshold); the causal
 * case with a sliding window and a soft cap. */
static void FN(check_attention_threads)(int causal)
{
    const attn_case c = {2, 3, 3, 70, 70, 33, causal, 0.3, causal ? 11 : 0, causal ? 3.0 : 0};
    const attn_layout l = attn_layout_of(1, &c);
    const int64_t NQ = l.n, NK = c.B * c.Hkv * c.S * c.D, NL = c.B * c.Hkv * c.T * c.g;
    real *q = FN(random)(NQ, 2), *dout = FN(random)(NQ, 1), *k = FN(random)(NK, 2);
    real *v = FN(random)(NK, 1), *r[2][5];
    const int64_t n[5] = {NQ, NL, NQ, NK, NK};
    for (int t = 0; t < 2; t++) {
        lora_set_num_threads(t + 1);
        for (int w = 0; w < 5; w++) r[t][w] = alloc(sizeof(real) * (size_t)n[w]);
        int st = FN(impl)->attention_forward(r[t][0], r[t][1], q, k, v, c.scale, causal, c.softcap, c.window, c.B,
                                             c.Hkv, c.g, c.T, c.S, c.D, l.s, l.s);
        st |= FN(impl)->attention_backward(r[t][2], r[t][3], r[t][4], dout, q, k, v, r[t][0], r[t][1], c.scale,
                                           causal, c.softcap, c.window, c.B, c.Hkv, c.g, c.T, c.S, c.D, l.s, l.s,
                                           l.s, l.s);
        if (st != LORA_OK) fail(STR(SFX) " attention threads: status");
    }
    const char *names[5] = {"out", "lse", "dq", "dk", "dv"};
    for (int w = 0; w < 5; w++) {
        char what[96];
        snprintf(what, sizeof what, STR(SFX) " attention %s causal=%d", names[w], causal);
        expect_equal(what, r[0][w], r[1][w], sizeof(real) * (size_t)n[w]);
        free(r[0][w]), free(r[1][w]);
    }
    lora_set_num_threads(0);
    free(q), free(dout), free(k), free(v);
}

/* NULL pointers and bad sizes: LORA_EINVAL, and no output written. B = Hkv = T = S = 1, g = 2, D = 3. */
static void FN(check_attention_errors)(void)
{
    real q[6] = {1, 2, 3, 4, 5, 6}, k[3] = {1, 0, 1}, v[3] = {2, 1, 0}, o[6], l[2], dq[6], dk[3], dv[3];
    const int64_t s[4] = {6, 6, 6, 3};
    for (int i = 0; i < 6; i++) o[i] = dq[i] = 7;
    l[0] = l[1] = dk[0] = dk[1] = dk[2] = dv[0] = dv[1] = dv[2] = 7;
    struct {
        const char *what;
        int status;
    } calls[] = {
        {"forward B<0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, -1, 1, 2, 1, 1, 3, s, s)},
        {"forward Hkv<0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, -1, 2, 1, 1, 3, s, s)},
        {"forward g=0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, 1, 0, 1, 1, 3, s, s)},
        {"forward T<0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, 1, 2, -1, 1, 3, s, s)},
        {"forward S<0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, 1, 2, 1, -1, 3, s, s)},
        {"forward D=0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 0, s, s)},
        {"forward out=NULL", FN(impl)->attention_forward(NULL, l, q, k, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward lse=NULL", FN(impl)->attention_forward(o, NULL, q, k, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward q=NULL", FN(impl)->attention_forward(o, l, NULL, k, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward k=NULL", FN(impl)->attention_forward(o, l, q, NULL, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward v=NULL", FN(impl)->attention_forward(o, l, q, k, NULL, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward q_strides=NULL", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, NULL, s)},
        {"forward out_strides=NULL", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, NULL)},
        {"forward window<0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, 0, -1, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward softcap<0", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, -1, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"forward softcap=NaN", FN(impl)->attention_forward(o, l, q, k, v, 1, 1, NAN, 0, 1, 1, 2, 1, 1, 3, s, s)},
        {"backward window<0", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, -2, 1, 1, 2, 1, 1,
            3, s, s, s, s)},
        {"backward softcap<0", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, -0.5, 0, 1, 1, 2, 1,
            1, 3, s, s, s, s)},
        {"backward B<0", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, -1, 1, 2, 1, 1, 3,
            s, s, s, s)},
        {"backward g=0", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 0, 1, 1, 3,
            s, s, s, s)},
        {"backward S<0", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 2, 1, -1, 3,
            s, s, s, s)},
        {"backward D=0", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 2, 1, 1, 0,
            s, s, s, s)},
        {"backward T<0", FN(impl)->attention_backward(NULL, NULL, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 2, -1, 1,
            3, s, s, s, s)},
        {"backward dout=NULL", FN(impl)->attention_backward(dq, dk, dv, NULL, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 2,
            1, 1, 3, s, s, s, s)},
        {"backward q=NULL", FN(impl)->attention_backward(dq, dk, dv, q, NULL, k, v, q, l, 1, 1, 0, 0, 1, 1, 2, 1,
            1, 3, s, s, s, s)},
        {"backward k=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, NULL, v, q, l, 1, 1, 0, 0, 1, 1, 2, 1,
            1, 3, s, s, s, s)},
        {"backward v=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, NULL, q, l, 1, 1, 0, 0, 1, 1, 2, 1,
            1, 3, s, s, s, s)},
        {"backward out=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, NULL, l, 1, 1, 0, 0, 1, 1, 2, 1,
            1, 3, s, s, s, s)},
        {"backward lse=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, NULL, 1, 1, 0, 0, 1, 1, 2, 1,
            1, 3, s, s, s, s)},
        {"backward dq_strides=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1,
            2, 1, 1, 3, NULL, s, s, s)},
        {"backward dout_strides=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1,
            2, 1, 1, 3, s, NULL, s, s)},
        {"backward q_strides=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 2,
            1, 1, 3, s, s, NULL, s)},
        {"backward out_strides=NULL", FN(impl)->attention_backward(dq, dk, dv, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1,
            2, 1, 1, 3, s, s, s, NULL)},
        {"backward no output, q=NULL", FN(impl)->attention_backward(NULL, NULL, NULL, q, NULL, k, v, q, l, 1, 1, 0,
            0, 1, 1, 2, 1, 1, 3, s, s, s, s)},
    };
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        char what[96];
        snprintf(what, sizeof what, STR(SFX) " attention %s -> LORA_EINVAL", calls[i].what);
        if (calls[i].status != LORA_EINVAL) fail(what);
    }
    int touched = l[0] != 7 || l[1] != 7;
    for (int i = 0; i < 6; i++) touched |= o[i] != 7 || dq[i] != 7;
    for (int i = 0; i < 3; i++) touched |= dk[i] != 7 || dv[i] != 7;
    if (touched) fail(STR(SFX) " attention: a refused call wrote an output");
    if (FN(impl)->attention_backward(NULL, NULL, NULL, q, q, k, v, q, l, 1, 1, 0, 0, 1, 1, 2, 1, 1, 3, s, s, s, s) !=
        LORA_OK)
        fail(STR(SFX) " attention_backward with no output: LORA_OK");
}

/* ---- rms_norm_forward / rms_norm_backward and rotary ------------------------------------------------
 * References in double from the definitions in lora_np.h, on the element type's inputs. Tolerance,
 * relative to the magnitude of the terms: y = x r w against RTOL |y| (r from the inputs; the kernel sums
 * the squares in VL lanes of the element type); rstd against RTOL r; gx = r (g w - xhat c), c = mean(g w
 * xhat), xhat = x r (r: the kernel's rstd, an input of the backward) against RTOL r (|g w| + |xhat|
 * mean|g w xhat|) since the two terms may cancel; gweight (start + sum over rows of g xhat) against
 * RTOL (|start| + sum |g xhat|); rotary, two products per element, against RTOL times their sum of
 * absolute values. */

/* rms_norm_forward on x [rows, n] (weight or NULL), then rms_norm_backward with the kernel's rstd;
 * gx starts as NaN (an element not written shows), gweight at random values (it accumulates). Then
 * gx alone and gweight alone (NULL for the other) give the full call's bits, and nothing asked is
 * LORA_OK. */
static void FN(check_rms_norm)(int64_t rows, int64_t n, int weighted, double mag, double eps)
{
    char name[128], what[192];
    const int64_t N = rows * n;
    snprintf(name, sizeof name, STR(SFX) " rms_norm %lldx%lld weight=%d mag=%g eps=%g", (long long)rows,
             (long long)n, weighted, mag, eps);
    real *x = FN(random)(N, mag), *g = FN(random)(N, 1), *w = weighted ? FN(random)(n, 2) : NULL;
    real *y = FN(attn_nans)(N), *rstd = FN(attn_nans)(rows), *gx = FN(attn_nans)(N);
    real *gx1 = FN(attn_nans)(N), *gw = FN(random)(n, 0.5), *gw1 = alloc(sizeof(real) * (size_t)n);
    memcpy(gw1, gw, sizeof(real) * (size_t)n);
    double *want = alloc(sizeof(double) * (size_t)N), *tol = alloc(sizeof(double) * (size_t)N);
    double *wr = alloc(sizeof(double) * (size_t)rows), *tr = alloc(sizeof(double) * (size_t)rows);
    double *wg = FN(widen)(gw, n), *tg = alloc(sizeof(double) * (size_t)n);
    const double e = (double)(real)eps;
    for (int64_t j = 0; j < n; j++) tg[j] = RTOL * fabs(wg[j]);
    /* forward: y = x r w, r = 1 / sqrt(mean(x^2) + eps), in double from the inputs */
    for (int64_t i = 0; i < rows; i++) {
        double ss = 0;
        for (int64_t j = 0; j < n; j++) ss += (double)x[i * n + j] * x[i * n + j];
        const double r = 1 / sqrt(ss / (double)n + e);
        wr[i] = r, tr[i] = RTOL * r;
        for (int64_t j = 0; j < n; j++) {
            want[i * n + j] = x[i * n + j] * r * (w ? (double)w[j] : 1.0);
            tol[i * n + j] = RTOL * fabs(want[i * n + j]);
        }
    }
    snprintf(what, sizeof what, "%s forward status", name);
    if (FN(impl)->rms_norm_forward(y, rstd, x, w, eps, rows, n) != LORA_OK) fail(what);
    FN(expect_close)(name, "y", y, want, tol, N);
    FN(expect_close)(name, "rstd", rstd, wr, tr, rows);
    /* backward, from the kernel's rstd r: gx = r (g w - xhat c), c = mean(g w xhat), xhat = x r;
     * gweight += sum over rows of g xhat */
    for (int64_t i = 0; i < rows; i++) {
        const double r = rstd[i];
        double c = 0, ca = 0;
        for (int64_t j = 0; j < n; j++) {
            const double gh = g[i * n + j] * (w ? (double)w[j] : 1.0), xh = x[i * n + j] * r;
            c += gh * xh, ca += fabs(gh * xh);
            wg[j] += g[i * n + j] * xh, tg[j] += RTOL * fabs(g[i * n + j] * xh);
        }
        c /= (double)n, ca /= (double)n;
        for (int64_t j = 0; j < n; j++) {
            const double gh = g[i * n + j] * (w ? (double)w[j] : 1.0), xh = x[i * n + j] * r;
            want[i * n + j] = r * (gh - xh * c);
            tol[i * n + j] = RTOL * r * (fabs(gh) + fabs(xh) * ca);
        }
    }
    snprintf(what, sizeof what, "%s backward status", name);
    if (FN(impl)->rms_norm_backward(gx, gw, g, x, w, rstd, rows, n) != LORA_OK) fail(what);
    FN(expect_close)(name, "gx", gx, want, tol, N);
    FN(expect_close)(name, "gweight", gw, wg, tg, n);
    int st = FN(impl)->rms_norm_backward(gx1, NULL, g, x, w, rstd, rows, n);
    st |= FN(impl)->rms_norm_backward(NULL, gw1, g, x, w, rstd, rows, n);
    st |= FN(impl)->rms_norm_backward(NULL, NULL, g, x, w, rstd, rows, n);
    snprintf(what, sizeof what, "%s backward NULL outputs status", name);
    if (st != LORA_OK) fail(what);
    snprintf(what, sizeof what, "%s gx alone (gweight NULL)", name);
    if (memcmp(gx1, gx, sizeof(real) * (size_t)N) != 0) fail(what);
    snprintf(what, sizeof what, "%s gweight alone (gx NULL)", name);
    if (memcmp(gw1, gw, sizeof(real) * (size_t)n) != 0) fail(what);
    free(x), free(g), free(w), free(y), free(rstd), free(gx), free(gx1), free(gw), free(gw1);
    free(want), free(tol), free(wr), free(tr), free(wg), free(tg);
}

/* rotary of x [B, H, T, D] in layout lx (attn_layout_of's kinds with g = 1: dense, the (B, T, H, D)
 * transpose, padded rows, reversed positions) into out in layout lo, forward and transpose, with
 * random cos / sin tables [T, rd] (their halves differ, unlike a rope table's): the first rd dims
 * rotated, the others copied (exactly). Pads of x are NaN (reading one shows), out starts as NaN and
 * its pads must stay NaN. */
static void FN(check_rotary)(int64_t B, int64_t H, int64_t T, int64_t D, int64_t rd, int lx, int lo)
{
    char name[160], what[224];
    const attn_case c = {B, H, 1, T, T, D, 0, 0};
    const attn_layout Lx = attn_layout_of(lx, &c), Lo = attn_layout_of(lo, &c);
    const int64_t N = B * H * T * D, h = rd / 2;
    real *xd = FN(random)(N, 2), *cs = FN(random)(T * rd, 1), *sn = FN(random)(T * rd, 1);
    double *x64 = FN(widen)(xd, N), *want = alloc(sizeof(double) * (size_t)N);
    double *tol = alloc(sizeof(double) * (size_t)N);
    real *x = FN(attn_scatter)(x64, &Lx, &c, (real)NAN);
    for (int transpose = 0; transpose < 2; transpose++) {
        snprintf(name, sizeof name, STR(SFX) " rotary B=%lld H=%lld T=%lld D=%lld rd=%lld layouts=%d%d transpose=%d",
                 (long long)B, (long long)H, (long long)T, (long long)D, (long long)rd, lx, lo, transpose);
        for (int64_t r = 0; r < B * H * T; r++) {
            const double *xr = x64 + r * D;
            const int64_t t = r % T; /* rows in (B, H, T) order */
            double cc[2], ss[2];
            for (int64_t j = rd; j < D; j++) want[r * D + j] = xr[j], tol[r * D + j] = 0; /* passed through */
            for (int64_t j = 0; j < h; j++) {
                cc[0] = cs[t * rd + j], cc[1] = cs[t * rd + j + h];
                ss[0] = sn[t * rd + j], ss[1] = sn[t * rd + j + h];
                double a1, b1, a2, b2; /* y1 = a1 + b1, y2 = a2 + b2 */
                if (!transpose)
                    a1 = xr[j] * cc[0], b1 = -xr[j + h] * ss[0], a2 = xr[j + h] * cc[1], b2 = xr[j] * ss[1];
                else
                    a1 = xr[j] * cc[0], b1 = xr[j + h] * ss[1], a2 = xr[j + h] * cc[1], b2 = -xr[j] * ss[0];
                want[r * D + j] = a1 + b1, tol[r * D + j] = RTOL * (fabs(a1) + fabs(b1));
                want[r * D + j + h] = a2 + b2, tol[r * D + j + h] = RTOL * (fabs(a2) + fabs(b2));
            }
        }
        real *out = FN(attn_nans)(Lo.n);
        snprintf(what, sizeof what, "%s status", name);
        if (FN(impl)->rotary(out + Lo.base, x + Lx.base, cs, sn, transpose, B, H, T, D, rd, Lx.s, Lo.s) != LORA_OK)
            fail(what);
        int pads_ok = 1;
        double *got = FN(attn_gather)(out, &Lo, &c, &pads_ok);
        snprintf(what, sizeof what, "%s", name);
        expect_close(what, got, want, tol, N);
        snprintf(what, sizeof what, "%s: a pad of out was written", name);
        if (!pads_ok) fail(what);
        if (transpose) { /* any non-zero transpose is the transpose */
            real *out2 = FN(attn_nans)(Lo.n);
            int st = FN(impl)->rotary(out2 + Lo.base, x + Lx.base, cs, sn, -7, B, H, T, D, rd, Lx.s, Lo.s);
            snprintf(what, sizeof what, "%s: transpose=-7 differs from transpose=1", name);
            int same = st == LORA_OK;
            for (int64_t i = 0; i < Lo.n; i++) same &= memcmp(out2 + i, out + i, sizeof(real)) == 0;
            if (!same) fail(what);
            free(out2);
        }
        free(got), free(out);
    }
    free(xd), free(cs), free(sn), free(x64), free(want), free(tol), free(x);
}

/* 1 and 2 threads: identical bits above the parallel threshold (1e5 elements): rms_norm over
 * 401 x 257, rotary over (2, 4, 100, 130) from and into the (B, T, H, D) transpose. */
static void FN(check_norm_rotary_threads)(void)
{
    const int64_t rows = 401, n = 257, N = rows * n;
    const attn_case c = {2, 4, 1, 100, 100, 130, 0, 0};
    const attn_layout L = attn_layout_of(1, &c);
    real *x = FN(random)(N, 3), *g = FN(random)(N, 1), *w = FN(random)(n, 1);
    real *q = FN(random)(L.n, 1), *cs = FN(random)(100 * 130, 1), *sn = FN(random)(100 * 130, 1);
    real *r[2][6];
    const int64_t len[6] = {N, rows, N, n, L.n, L.n};
    for (int t = 0; t < 2; t++) {
        lora_set_num_threads(t + 1);
        for (int k = 0; k < 6; k++) r[t][k] = alloc(sizeof(real) * (size_t)len[k]);
        memset(r[t][3], 0, sizeof(real) * (size_t)n);
        int st = FN(impl)->rms_norm_forward(r[t][0], r[t][1], x, w, 1e-6, rows, n);
        st |= FN(impl)->rms_norm_backward(r[t][2], r[t][3], g, x, w, r[t][1], rows, n);
        st |= FN(impl)->rotary(r[t][4], q, cs, sn, 0, c.B, c.Hkv, c.T, c.D, c.D, L.s, L.s);
        st |= FN(impl)->rotary(r[t][5], q, cs, sn, 1, c.B, c.Hkv, c.T, c.D, c.D, L.s, L.s);
        if (st != LORA_OK) fail(STR(SFX) " rms_norm / rotary threads: status");
    }
    const char *names[6] = {"rms_norm y", "rms_norm rstd", "rms_norm gx", "rms_norm gweight", "rotary",
                            "rotary transpose"};
    for (int k = 0; k < 6; k++) {
        char what[96];
        snprintf(what, sizeof what, STR(SFX) " %s", names[k]);
        expect_equal(what, r[0][k], r[1][k], sizeof(real) * (size_t)len[k]);
        free(r[0][k]), free(r[1][k]);
    }
    lora_set_num_threads(0);
    free(x), free(g), free(w), free(q), free(cs), free(sn);
}

/* NULL pointers and bad sizes: LORA_EINVAL, and no output written. rows = 1, n = 4; B = H = T = 1, D = 4. */
static void FN(check_norm_rotary_errors)(void)
{
    real x[4] = {1, 2, 3, 4}, w[4] = {1, 1, 2, 2}, cs[4] = {1, 0, 1, 0}, sn[4] = {0, 1, 0, 1}, r1[1] = {0.5};
    real y[4], rs[1], gx[4], gw[4], o[4];
    const int64_t s[3] = {4, 4, 4};
    for (int i = 0; i < 4; i++) y[i] = gx[i] = gw[i] = o[i] = 7;
    rs[0] = 7;
    struct {
        const char *what;
        int status;
    } calls[] = {
        {"rms_norm_forward rows<0", FN(impl)->rms_norm_forward(y, rs, x, w, 1e-6, -1, 4)},
        {"rms_norm_forward n=0", FN(impl)->rms_norm_forward(y, rs, x, w, 1e-6, 1, 0)},
        {"rms_norm_forward n<0", FN(impl)->rms_norm_forward(y, rs, x, w, 1e-6, 1, -4)},
        {"rms_norm_forward y=NULL", FN(impl)->rms_norm_forward(NULL, rs, x, w, 1e-6, 1, 4)},
        {"rms_norm_forward rstd=NULL", FN(impl)->rms_norm_forward(y, NULL, x, w, 1e-6, 1, 4)},
        {"rms_norm_forward x=NULL", FN(impl)->rms_norm_forward(y, rs, NULL, w, 1e-6, 1, 4)},
        {"rms_norm_backward rows<0", FN(impl)->rms_norm_backward(gx, gw, x, x, w, r1, -1, 4)},
        {"rms_norm_backward n=0", FN(impl)->rms_norm_backward(gx, gw, x, x, w, r1, 1, 0)},
        {"rms_norm_backward n<0", FN(impl)->rms_norm_backward(gx, gw, x, x, w, r1, 1, -2)},
        {"rms_norm_backward g=NULL", FN(impl)->rms_norm_backward(gx, gw, NULL, x, w, r1, 1, 4)},
        {"rms_norm_backward x=NULL", FN(impl)->rms_norm_backward(gx, gw, x, NULL, w, r1, 1, 4)},
        {"rms_norm_backward rstd=NULL", FN(impl)->rms_norm_backward(gx, gw, x, x, w, NULL, 1, 4)},
        {"rms_norm_backward gweight only, x=NULL", FN(impl)->rms_norm_backward(NULL, gw, x, NULL, w, r1, 1, 4)},
        {"rotary B<0", FN(impl)->rotary(o, x, cs, sn, 0, -1, 1, 1, 4, 4, s, s)},
        {"rotary H<0", FN(impl)->rotary(o, x, cs, sn, 0, 1, -1, 1, 4, 4, s, s)},
        {"rotary T<0", FN(impl)->rotary(o, x, cs, sn, 1, 1, 1, -1, 4, 4, s, s)},
        {"rotary D<0", FN(impl)->rotary(o, x, cs, sn, 0, 1, 1, 1, -4, -4, s, s)},
        {"rotary D=3", FN(impl)->rotary(o, x, cs, sn, 0, 1, 1, 1, 3, 3, s, s)},
        {"rotary D=1", FN(impl)->rotary(o, x, cs, sn, 1, 1, 1, 1, 1, 1, s, s)},
        {"rotary rd=3", FN(impl)->rotary(o, x, cs, sn, 0, 1, 1, 1, 4, 3, s, s)},
        {"rotary rd=6 > D", FN(impl)->rotary(o, x, cs, sn, 0, 1, 1, 1, 4, 6, s, s)},
        {"rotary rd<0", FN(impl)->rotary(o, x, cs, sn, 1, 1, 1, 1, 4, -2, s, s)},
        {"rotary out=NULL", FN(impl)->rotary(NULL, x, cs, sn, 0, 1, 1, 1, 4, 4, s, s)},
        {"rotary x=NULL", FN(impl)->rotary(o, NULL, cs, sn, 0, 1, 1, 1, 4, 4, s, s)},
        {"rotary cos=NULL", FN(impl)->rotary(o, x, NULL, sn, 0, 1, 1, 1, 4, 4, s, s)},
        {"rotary sin=NULL", FN(impl)->rotary(o, x, cs, NULL, 0, 1, 1, 1, 4, 4, s, s)},
        {"rotary x_strides=NULL", FN(impl)->rotary(o, x, cs, sn, 0, 1, 1, 1, 4, 4, NULL, s)},
        {"rotary out_strides=NULL", FN(impl)->rotary(o, x, cs, sn, 1, 1, 1, 1, 4, 4, s, NULL)},
    };
    for (size_t i = 0; i < sizeof calls / sizeof calls[0]; i++) {
        char what[96];
        snprintf(what, sizeof what, STR(SFX) " %s -> LORA_EINVAL", calls[i].what);
        if (calls[i].status != LORA_EINVAL) fail(what);
    }
    int touched = rs[0] != 7;
    for (int i = 0; i < 4; i++) touched |= y[i] != 7 || gx[i] != 7 || gw[i] != 7 || o[i] != 7;
    if (touched) fail(STR(SFX) " rms_norm / rotary: a refused call wrote an output");
    /* weight NULL is no weight, not an error; nothing asked of the backward: LORA_OK */
    if (FN(impl)->rms_norm_forward(y, rs, x, NULL, 1e-6, 1, 4) != LORA_OK)
        fail(STR(SFX) " rms_norm_forward with weight=NULL: LORA_OK");
    if (FN(impl)->rms_norm_backward(NULL, NULL, x, x, NULL, r1, 1, 4) != LORA_OK)
        fail(STR(SFX) " rms_norm_backward with no output: LORA_OK");
}

#undef RTOL
#undef FLOOR
