/* step_kernels_simd.h: the SIMD workers of step_kernels.c for one element type and instruction set.
 * step_kernels.c includes it once per (`real`, SFX, IS_F32) and ISA (v3: AVX2 + FMA with
 * VBYTES = 32, under #pragma GCC target; base: the compiler's baseline with VBYTES = 16), so each
 * function exists as name_f32_v3, name_f32_base, ...
 *
 * exp: float32 uses the vector polynomial vexp below (Cephes' expf: range reduction by ln 2 in
 * two parts, a degree-5 polynomial, the power of two put into the exponent bits): within 2 ulp
 * of the correctly rounded result over [-87.3, 88.4], +inf above, 0 below (no denormals), NaN
 * kept. float64 calls the C library's exp, element by element: that type is for checking, and
 * must agree with NumPy to 1e-12.
 */
#define CAT3_(a, b, c) a##_##b##_##c
#define CAT3(a, b, c) CAT3_(a, b, c)
#define FN(name) CAT3(name, SFX, ISA)
#define VL ((int64_t)(VBYTES / sizeof(real)))

typedef real FN(vec) __attribute__((vector_size(VBYTES), aligned(sizeof(real)), may_alias));
#define vec FN(vec)

ALWAYS_INLINE vec FN(load)(const real *p) { return *(const vec *)p; }
ALWAYS_INLINE void FN(store)(real *p, vec v) { *(vec *)p = v; }
ALWAYS_INLINE vec FN(splat)(real s) { return (vec){0} + s; }

#if IS_F32
typedef int32_t FN(ivec) __attribute__((vector_size(VBYTES), aligned(4), may_alias));
#else
typedef int64_t FN(ivec) __attribute__((vector_size(VBYTES), aligned(8), may_alias));
#endif
#define ivec FN(ivec)
/* m ? a : b, lane by lane, for a mask m of all-ones / all-zeros lanes (a vector comparison). */
#define SEL(m, a, b) ((vec)(((ivec)(a) & (m)) | ((ivec)(b) & ~(m))))

#if IS_F32

ALWAYS_INLINE vec FN(vexp)(vec x)
{
    const vec hi = FN(splat)(88.3762626647949f), lo = FN(splat)(-87.3365447504f);
    const vec magic = FN(splat)(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    ivec over = x > hi, under = x < lo;
    vec xc = SEL(over, hi, SEL(under, lo, x));
    vec t = xc * 1.44269504088896341f + magic;
    vec n = t - magic;                                   /* round(x / ln 2), in [-126, 127] */
    ivec ni = (ivec)t - (ivec)magic;
    vec r = xc - n * 0.693359375f;                       /* x - n ln 2, ln 2 in two parts */
    r = r - n * -2.12194440e-4f;
    vec p = FN(splat)(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    vec y = p * (vec)((ni + 127) << 23);                 /* times 2^n */
    y = SEL(over, FN(splat)(INFINITY), y);
    return SEL(under, FN(splat)(0.0f), y);
}

ALWAYS_INLINE vec FN(vsigmoid)(vec x) { return 1.0f / (1.0f + FN(vexp)(-x)); }
#endif

/* ---- SwiGLU gate: out = silu(a) * b = a * sigmoid(a) * b --------------------------------- */

#if IS_F32
/* VL lanes of forward and backward; the element-wise order of operations is NumPy's
 * (functional._sigmoid / _silu_grad), only exp differs. */
ALWAYS_INLINE void FN(silu_mul_fwd_vec)(real *out, const real *a, const real *b)
{
    vec av = FN(load)(a);
    FN(store)(out, FN(vsigmoid)(av) * av * FN(load)(b));
}

ALWAYS_INLINE void FN(silu_mul_bwd_vec)(real *ga, real *gb, const real *g, const real *a, const real *b)
{
    vec av = FN(load)(a), gv = FN(load)(g), s = FN(vsigmoid)(av);
    if (ga) FN(store)(ga, ((1.0f - s) * av + 1.0f) * s * FN(load)(b) * gv);
    if (gb) FN(store)(gb, s * av * gv);
}

/* The last n < VL elements go through a padded copy, so that every element gets the same
 * arithmetic wherever it sits. */
static void FN(silu_mul_fwd)(real *out, const real *a, const real *b, int64_t n)
{
    int64_t i = 0;
    for (; i + VL <= n; i += VL) FN(silu_mul_fwd_vec)(out + i, a + i, b + i);
    if (i < n) {
        real ta[VL], tb[VL], to[VL];
        for (int64_t l = 0; l < VL; l++) ta[l] = i + l < n ? a[i + l] : 0, tb[l] = i + l < n ? b[i + l] : 0;
        FN(silu_mul_fwd_vec)(to, ta, tb);
        for (int64_t l = 0; i + l < n; l++) out[i + l] = to[l];
    }
}

static void FN(silu_mul_bwd)(real *ga, real *gb, const real *g, const real *a, const real *b, int64_t n)
{
    int64_t i = 0;
    for (; i + VL <= n; i += VL) FN(silu_mul_bwd_vec)(ga ? ga + i : 0, gb ? gb + i : 0, g + i, a + i, b ? b + i : 0);
    if (i < n) {
        real tg[VL], ta[VL], tb[VL], tga[VL], tgb[VL];
        for (int64_t l = 0; l < VL; l++) {
            tg[l] = i + l < n ? g[i + l] : 0;
            ta[l] = i + l < n ? a[i + l] : 0;
            tb[l] = i + l < n && b ? b[i + l] : 0;
        }
        FN(silu_mul_bwd_vec)(ga ? tga : 0, gb ? tgb : 0, tg, ta, tb);
        for (int64_t l = 0; i + l < n; l++) {
            if (ga) ga[i + l] = tga[l];
            if (gb) gb[i + l] = tgb[l];
        }
    }
}
#else
static void FN(silu_mul_fwd)(real *out, const real *a, const real *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++) out[i] = 1.0 / (1.0 + exp(-a[i])) * a[i] * b[i];
}

static void FN(silu_mul_bwd)(real *ga, real *gb, const real *g, const real *a, const real *b, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        real s = 1.0 / (1.0 + exp(-a[i]));
        if (ga) ga[i] = ((1.0 - s) * a[i] + 1.0) * s * b[i] * g[i];
        if (gb) gb[i] = s * a[i] * g[i];
    }
}
#endif

/* ---- rows of probabilities ----------------------------------------------------------------- */

/* p [vis] = exp(p - c) in place; returns the sum of the results (added in double every 8 vectors,
 * so that a long row keeps float32's sum accurate to about 1e-7). */
static double FN(exp_shift)(real *p, real c, int64_t vis)
{
    double sum = 0;
    int64_t j = 0;
#if IS_F32
    const vec cv = FN(splat)(c);
    while (j + VL <= vis) {
        vec acc = {0};
        for (int k = 0; k < 8 && j + VL <= vis; k++, j += VL) {
            vec e = FN(vexp)(FN(load)(p + j) - cv);
            FN(store)(p + j, e);
            acc += e;
        }
        for (int l = 0; l < VL; l++) sum += acc[l];
    }
    if (j < vis) {
        real t[VL];
        for (int64_t l = 0; l < VL; l++) t[l] = j + l < vis ? p[j + l] : -INFINITY;
        vec e = FN(vexp)(FN(load)(t) - cv);
        for (int64_t l = 0; j + l < vis; l++) p[j + l] = e[l], sum += e[l];
    }
#else
    for (; j < vis; j++) sum += (p[j] = exp(p[j] - c));
#endif
    return sum;
}

/* The largest of p [vis] (-inf when vis == 0; NaNs are passed over here and reach the sum). */
static real FN(row_max)(const real *p, int64_t vis)
{
    real m = -INFINITY;
    int64_t j = 0;
    if (vis >= VL) {
        vec mv = FN(load)(p);
        for (j = VL; j + VL <= vis; j += VL) {
            vec v = FN(load)(p + j);
            mv = SEL(v > mv, v, mv);
        }
        for (int l = 0; l < VL; l++) m = mv[l] > m ? mv[l] : m;
    }
    for (; j < vis; j++) m = p[j] > m ? p[j] : m;
    return m;
}

/* One row: p [n] <- scale * softmax of its first vis entries, 0 after them; *lse = log-sum-exp of
 * those vis entries, +inf when there are none or all are -inf (then the row is all 0). */
static void FN(softmax_row)(real *p, real *lse, real scale, int64_t vis, int64_t n)
{
    real m = FN(row_max)(p, vis);
    if (vis == 0 || m == -INFINITY) {
        memset(p, 0, sizeof(real) * (size_t)n);
        *lse = INFINITY;
        return;
    }
    double sum = FN(exp_shift)(p, m, vis);
    real c = (real)(scale / sum);
    for (int64_t j = 0; j < vis; j++) p[j] *= c;
    memset(p + vis, 0, sizeof(real) * (size_t)(n - vis));
    *lse = m + (real)log(sum);
}

/* One row: p [n] <- exp(p - lse) for its first vis entries, 0 after them. */
static void FN(exp_row)(real *p, real lse, int64_t vis, int64_t n)
{
    if (lse == INFINITY) vis = 0;
    FN(exp_shift)(p, lse, vis);
    memset(p + vis, 0, sizeof(real) * (size_t)(n - vis));
}

#undef ivec
#undef SEL
#undef vec
#undef VL
#undef FN
#undef CAT3
#undef CAT3_
