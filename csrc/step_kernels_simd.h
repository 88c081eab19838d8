/* step_kernels_simd.h: the SIMD workers of step_kernels.c for one element type and instruction set.
 * step_kernels.c instantiates it (instantiate.h) once per (`real`, SFX, IS_F32) and ISA (v3: AVX2 + FMA with
 * VBYTES = 32, under #pragma GCC target; base: the compiler's baseline with VBYTES = 16), so each
 * function exists as name_f32_v3, name_f32_base, ...
 *
 * exp: float32 uses the vector polynomial vexp below (Cephes' expf: range reduction by ln 2 in
 * two parts, a degree-5 polynomial, the power of two put into the exponent bits): within 2 ulp
 * of the correctly rounded result over [-87.3, 88.72], +inf above, 0 below (no denormals: they
 * would be slow and are 0 to a softmax or a sigmoid anyway), NaN kept. float64 calls the C
 * library's exp, element by element: that type is for checking, and must agree with NumPy to
 * 1e-12.
 */
#include "simd_vec.h"

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
    const vec hi = FN(splat)(88.7228391f), lo = FN(splat)(-87.3365447504f);   /* ln FLT_MAX, ln FLT_MIN */
    const vec magic = FN(splat)(12582912.0f); /* 1.5 * 2^23: adding it rounds to an integer */
    ivec over = x > hi, under = x < lo;
    vec xc = SEL(over, hi, SEL(under, lo, x));
    vec t = xc * 1.44269504088896341f + magic;
    vec n = t - magic;                                   /* round(x / ln 2), in [-126, 128] */
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
    ivec n1 = ni >> 1, n2 = ni - n1;                     /* 2^n as 2^n1 * 2^n2: n = 128 has no float */
    vec y = p * (vec)((n1 + 127) << 23) * (vec)((n2 + 127) << 23);
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

/* The largest of p [vis] (-inf when vis == 0). NaNs are passed over here; they still make the
 * row's sum, lse and probabilities NaN (softmax_row). */
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
 * those vis entries, +inf when there are none or all are -inf (then the row is all 0). A NaN or
 * +inf among them makes the visible entries and lse NaN. */
static void FN(softmax_row)(real *p, real *lse, real scale, int64_t vis, int64_t n)
{
    real m = FN(row_max)(p, vis);
    if (vis == 0 || m == -INFINITY) { /* no finite column, unless a NaN hid from row_max */
        int nan = 0;
        for (int64_t j = 0; j < vis; j++) nan |= p[j] != p[j];
        for (int64_t j = 0; j < n; j++) p[j] = j < vis && nan ? NAN : 0;
        *lse = nan ? NAN : INFINITY;
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


/* ---- small matrix products for attention ------------------------------------------------ */

#define MR 6          /* rows of C per register tile */
#define NR (2 * VL)   /* columns of C per register tile */

/* C [MB, NR] (row stride ldc) = beta * C + alpha * A B over K terms, added in order k = 0..K-1;
 * A (i, k) = A[i * sai + k * sak]: any layout, read one element at a time; B (k, j) = B[k * ldb + j]. */
ALWAYS_INLINE void FN(gemm_tile)(real *restrict C, int64_t ldc, const real *restrict A, int64_t sai, int64_t sak,
                                 const real *restrict B, int64_t ldb, int64_t K, real alpha, int add, const int MB)
{
    vec c[MR][2];
    for (int m = 0; m < MB; m++) c[m][0] = c[m][1] = (vec){0};
    for (int64_t k = 0; k < K; k++) {
        vec b0 = FN(load)(B + k * ldb), b1 = FN(load)(B + k * ldb + VL);
        for (int m = 0; m < MB; m++) {
            real a = A[m * sai + k * sak];
            c[m][0] += a * b0;
            c[m][1] += a * b1;
        }
    }
    for (int m = 0; m < MB; m++) {
        real *cr = C + m * ldc;
        if (add) {
            FN(store)(cr, FN(load)(cr) + alpha * c[m][0]);
            FN(store)(cr + VL, FN(load)(cr + VL) + alpha * c[m][1]);
        } else {
            FN(store)(cr, alpha * c[m][0]);
            FN(store)(cr + VL, alpha * c[m][1]);
        }
    }
}

/* Rows [0, mb) of a tile, mb <= MR: gemm_tile with the row count a constant. */
static inline void FN(gemm_tile_rows)(real *restrict C, int64_t ldc, const real *restrict A, int64_t sai, int64_t sak,
                                      const real *restrict B, int64_t ldb, int64_t K, real alpha, int add, int64_t mb)
{
    switch (mb) {
    case 6: FN(gemm_tile)(C, ldc, A, sai, sak, B, ldb, K, alpha, add, 6); break;
    case 5: FN(gemm_tile)(C, ldc, A, sai, sak, B, ldb, K, alpha, add, 5); break;
    case 4: FN(gemm_tile)(C, ldc, A, sai, sak, B, ldb, K, alpha, add, 4); break;
    case 3: FN(gemm_tile)(C, ldc, A, sai, sak, B, ldb, K, alpha, add, 3); break;
    case 2: FN(gemm_tile)(C, ldc, A, sai, sak, B, ldb, K, alpha, add, 2); break;
    case 1: FN(gemm_tile)(C, ldc, A, sai, sak, B, ldb, K, alpha, add, 1); break;
    default: break;
    }
}

#define GEMM_STACK_PACK 4096 /* reals of the remainder's packed B kept on the stack (K * NR up to this) */

/* C [M, N] (row stride ldc) = (add ? C : 0) + alpha * A [M, K] B [K, N], A and B as in gemm_tile.
 * The columns past the last full NR-wide tile (attention's key counts are seldom multiples of NR) are
 * copied, zero-padded to NR, into a packed Bp [K, NR] and go through the same tile into a scratch tile;
 * each element is still the sum over k in order. Plain loops only if Bp cannot be allocated. */
static void FN(gemm)(real *restrict C, int64_t ldc, const real *restrict A, int64_t sai, int64_t sak,
                     const real *restrict B, int64_t ldb, int64_t M, int64_t N, int64_t K, real alpha, int add)
{
    const int64_t full = N / NR * NR, rem = N - full;
    for (int64_t j = 0; j < full; j += NR)
        for (int64_t i = 0; i < M; i += MR)
            FN(gemm_tile_rows)(C + i * ldc + j, ldc, A + i * sai, sai, sak, B + j, ldb, K, alpha, add,
                               M - i < MR ? M - i : MR);
    if (!rem || M <= 0) return;
    real stack[GEMM_STACK_PACK], tile[MR * NR];
    real *Bp = K * NR <= GEMM_STACK_PACK ? stack : malloc(sizeof(real) * (size_t)(K * NR));
    if (!Bp) {
        for (int64_t i = 0; i < M; i++)
            for (int64_t j = full; j < N; j++) {
                real acc = 0;
                for (int64_t k = 0; k < K; k++) acc += A[i * sai + k * sak] * B[k * ldb + j];
                C[i * ldc + j] = add ? C[i * ldc + j] + alpha * acc : alpha * acc;
            }
        return;
    }
    for (int64_t k = 0; k < K; k++) {                                     /* Bp [K, NR] */
        for (int64_t c = 0; c < rem; c++) Bp[k * NR + c] = B[k * ldb + full + c];
        for (int64_t c = rem; c < NR; c++) Bp[k * NR + c] = 0;
    }
    for (int64_t i = 0; i < M; i += MR) {
        const int64_t mb = M - i < MR ? M - i : MR;
        FN(gemm_tile_rows)(tile, NR, A + i * sai, sai, sak, Bp, NR, K, 1, 0, mb);   /* tile [mb, NR] */
        for (int64_t m = 0; m < mb; m++)
            for (int64_t c = 0; c < rem; c++) {
                real *cij = C + (i + m) * ldc + full + c;
                *cij = add ? *cij + alpha * tile[m * NR + c] : alpha * tile[m * NR + c];
            }
    }
    if (Bp != stack) free(Bp);
}

#undef GEMM_STACK_PACK

/* ---- attention for one (batch element, key/value head) ------------------------------------
 * The g query heads of key/value head h are rows i = t * g + j (position t, head j) of a
 * (T * g, D) matrix; row i of q, out, dq and dout sits at base + t * st + j * sj (the caller
 * has added the batch and head offsets). k, v, dk, dv are this head's dense (S, D) matrices,
 * lse its dense (T * g) log-sum-exps. Queries go in blocks of tb positions (rows = tb * g);
 * a block computes only the keys [k0, n) its rows see: from the window's lower edge of its first
 * row to the causal limit of its last (keys outside are never computed: a window makes a long
 * sequence cost T (W + tb) products, not T S); each row's softmax is taken over its own span. */

/* Keys [*k0, n) computed for the block of positions [t0, t1); n == *k0 when it sees none. */
static int64_t FN(block_keys)(const attn_dims *d, int64_t t0, int64_t t1, int64_t *k0)
{
    int64_t lo = d->window ? t0 + d->S - d->T - d->window + 1 : 0, n = d->causal ? t1 + d->S - d->T : d->S;
    lo = lo < 0 ? 0 : lo > d->S ? d->S : lo;
    n = n < lo ? lo : n > d->S ? d->S : n;
    *k0 = lo;
    return n;
}

/* The columns [*a, return) of a block's row i (keys [k0, k0 + nk), block from position t0) that the
 * row sees: keys s with s > t + S - T - window and (causal) s <= t + S - T; *a == return when none. */
static int64_t FN(row_span)(const attn_dims *d, int64_t t0, int64_t k0, int64_t nk, int64_t i, int64_t *a)
{
    const int64_t p = t0 + i / d->g + d->S - d->T; /* the row's absolute position */
    int64_t lo = d->window ? p - d->window + 1 - k0 : 0, hi = d->causal ? p + 1 - k0 : nk;
    lo = lo < 0 ? 0 : lo > nk ? nk : lo;
    hi = hi < lo ? lo : hi > nk ? nk : hi;
    *a = lo;
    return hi;
}

/* p [n] <- c tanh(p / c) (the soft cap); dcap [n] = 1 - tanh^2 unless NULL. */
static void FN(cap_row)(real *p, real *dcap, real c, int64_t n)
{
    for (int64_t j = 0; j < n; j++) {
#if IS_F32
        const real t = tanhf(p[j] / c);
#else
        const real t = tanh(p[j] / c);
#endif
        p[j] = c * t;
        if (dcap) dcap[j] = 1 - t * t;
    }
}

/* dst [D, n] = src [n, D]^T, the dense transposes that the products read as B. */
static void FN(transpose_keys)(real *restrict dst, const real *restrict src, int64_t n, int64_t D)
{
    for (int64_t s = 0; s < n; s++)
        for (int64_t e = 0; e < D; e++) dst[e * n + s] = src[s * D + e];
}

/* dst [rows, D] = scale * the block's rows of a (strided) matrix. */
static void FN(gather_rows)(real *restrict dst, const real *restrict base, int64_t st, int64_t sj, int64_t t0,
                            int64_t rows, int64_t g, int64_t D, real scale)
{
    for (int64_t i = 0; i < rows; i++) {
        const real *src = base + (t0 + i / g) * st + (i % g) * sj;
        for (int64_t e = 0; e < D; e++) dst[i * D + e] = scale * src[e];
    }
}

/* scratch: (tb * g) * (2 D + S) + D * S reals. */
static void FN(attn_fwd_head)(real *out, int64_t ost, int64_t osj, real *lse, const real *q, int64_t qst, int64_t qsj,
                              const real *k, const real *v, const attn_dims *d, real *scratch)
{
    const int64_t T = d->T, S = d->S, D = d->D, g = d->g, tb = d->tb;
    real *Qb = scratch, *Ob = Qb + tb * g * D, *P = Ob + tb * g * D, *KT = P + tb * g * S;
    FN(transpose_keys)(KT, k, S, D);                                     /* KT [D, S] */
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
        int64_t k0;
        const int64_t t1 = t0 + tb < T ? t0 + tb : T, rows = (t1 - t0) * g, nk = FN(block_keys)(d, t0, t1, &k0) - k0;
        FN(gather_rows)(Qb, q, qst, qsj, t0, rows, g, D, (real)d->scale);       /* Qb [rows, D] = scale q */
        FN(gemm)(P, nk, Qb, D, 1, KT + k0, S, rows, nk, D, 1, 0);          /* P [rows, nk] = Qb K[k0:]^T */
        for (int64_t i = 0; i < rows; i++) {
            int64_t a, b = FN(row_span)(d, t0, k0, nk, i, &a);
            if (d->softcap) FN(cap_row)(P + i * nk + a, NULL, (real)d->softcap, b - a);
            memset(P + i * nk, 0, sizeof(real) * (size_t)a);
            FN(softmax_row)(P + i * nk + a, lse + t0 * g + i, 1, b - a, nk - a);
        }
        FN(gemm)(Ob, D, P, nk, 1, v + k0 * D, D, rows, D, nk, 1, 0);      /* Ob [rows, D] = P V[k0:] */
        for (int64_t i = 0; i < rows; i++)
            memcpy(out + (t0 + i / g) * ost + (i % g) * osj, Ob + i * D, sizeof(real) * (size_t)D);
    }
}

/* dk, dv (S, D) are overwritten; dq rows written; any of the three may be NULL.
 * scratch: (tb * g) * (3 D + 3 S + 1) + 2 D * S reals. */
static void FN(attn_bwd_head)(real *dq, int64_t dqst, int64_t dqsj, real *dk, real *dv, const real *dout,
                              int64_t dost, int64_t dosj, const real *q, int64_t qst, int64_t qsj, const real *k,
                              const real *v, const real *out, int64_t ost, int64_t osj, const real *lse,
                              const attn_dims *d, real *scratch)
{
    const int64_t T = d->T, S = d->S, D = d->D, g = d->g, tb = d->tb, R = tb * g;
    real *Qb = scratch, *dOb = Qb + R * D, *dQb = dOb + R * D, *P = dQb + R * D, *dP = P + R * S;
    real *dcap = dP + R * S, *delta = dcap + R * S, *KT = delta + R, *VT = KT + D * S;
    FN(transpose_keys)(KT, k, S, D);
    FN(transpose_keys)(VT, v, S, D);
    if (dk) memset(dk, 0, sizeof(real) * (size_t)(S * D));
    if (dv) memset(dv, 0, sizeof(real) * (size_t)(S * D));
    for (int64_t t0 = 0; t0 < T; t0 += tb) {
        int64_t k0;
        const int64_t t1 = t0 + tb < T ? t0 + tb : T, rows = (t1 - t0) * g, nk = FN(block_keys)(d, t0, t1, &k0) - k0;
        FN(gather_rows)(dOb, dout, dost, dosj, t0, rows, g, D, 1);         /* dOb [rows, D] */
        for (int64_t i = 0; i < rows; i++) {                              /* delta = rowsum(dO * O) */
            const real *o = out + (t0 + i / g) * ost + (i % g) * osj;
            real acc = 0;
            for (int64_t e = 0; e < D; e++) acc += dOb[i * D + e] * o[e];
            delta[i] = acc;
        }
        if (nk == 0) {
            if (dq)
                for (int64_t i = 0; i < rows; i++) memset(dq + (t0 + i / g) * dqst + (i % g) * dqsj, 0, sizeof(real) * (size_t)D);
            continue;
        }
        FN(gather_rows)(Qb, q, qst, qsj, t0, rows, g, D, (real)d->scale);        /* Qb = scale q */
        FN(gemm)(P, nk, Qb, D, 1, KT + k0, S, rows, nk, D, 1, 0);          /* scores */
        for (int64_t i = 0; i < rows; i++) {                              /* probabilities */
            int64_t a, b = FN(row_span)(d, t0, k0, nk, i, &a);
            if (d->softcap) FN(cap_row)(P + i * nk + a, dcap + i * nk + a, (real)d->softcap, b - a);
            memset(P + i * nk, 0, sizeof(real) * (size_t)a);
            FN(exp_row)(P + i * nk + a, lse[t0 * g + i], b - a, nk - a);
        }
        if (dv) FN(gemm)(dv + k0 * D, D, P, 1, nk, dOb, D, nk, D, rows, 1, 1);   /* dV [k0:] += P^T dO */
        if (!dq && !dk) continue;
        FN(gemm)(dP, nk, dOb, D, 1, VT + k0, S, rows, nk, D, 1, 0);        /* dP [rows, nk] = dO V[k0:]^T */
        for (int64_t i = 0; i < rows; i++) {                               /* dS = P * (dP - delta) */
            for (int64_t s = 0; s < nk; s++) dP[i * nk + s] = (dP[i * nk + s] - delta[i]) * P[i * nk + s];
            if (d->softcap) {                                              /* through the cap: * (1 - tanh^2) */
                int64_t a, b = FN(row_span)(d, t0, k0, nk, i, &a);
                for (int64_t s = a; s < b; s++) dP[i * nk + s] *= dcap[i * nk + s];
            }
        }
        if (dq) {
            FN(gemm)(dQb, D, dP, nk, 1, k + k0 * D, D, rows, D, nk, (real)d->scale, 0);   /* dQ = scale dS K[k0:] */
            for (int64_t i = 0; i < rows; i++)
                memcpy(dq + (t0 + i / g) * dqst + (i % g) * dqsj, dQb + i * D, sizeof(real) * (size_t)D);
        }
        if (dk) FN(gemm)(dk + k0 * D, D, dP, 1, nk, Qb, D, nk, D, rows, 1, 1);   /* dK [k0:] += dS^T Qb */
    }
}

#undef MR
#undef NR

/* ---- RMSNorm and rotary embedding, one row at a time ---------------------------------------- */

/* sum of a[j] * b[j] over n, in VL lanes then across them (a fixed order for a given n). */
static real FN(dot)(const real *a, const real *b, int64_t n)
{
    vec acc = {0};
    int64_t j = 0;
    for (; j + VL <= n; j += VL) acc += FN(load)(a + j) * FN(load)(b + j);
    real s = 0;
    for (int l = 0; l < VL; l++) s += acc[l];
    for (; j < n; j++) s += a[j] * b[j];
    return s;
}

/* y [n] = x * rstd * w (w NULL: 1), *rstd = 1 / sqrt(mean(x^2) + eps). */
static void FN(rms_norm_row)(real *y, real *rstd, const real *x, const real *w, real eps, int64_t n)
{
    real r = (real)1 / (real)sqrt(FN(dot)(x, x, n) / (real)n + eps);
    *rstd = r;
    if (w)
        for (int64_t j = 0; j < n; j++) y[j] = x[j] * r * w[j];
    else
        for (int64_t j = 0; j < n; j++) y[j] = x[j] * r;
}

/* gx [n] = rstd * (g w - xhat * mean(g w xhat)), xhat = x * rstd; gh [n]: scratch. */
static void FN(rms_norm_grad_row)(real *gx, const real *g, const real *x, const real *w, real rstd, int64_t n,
                                  real *gh)
{
    for (int64_t j = 0; j < n; j++) gh[j] = w ? g[j] * w[j] : g[j];
    real c = FN(dot)(gh, x, n) * rstd / (real)n;
    for (int64_t j = 0; j < n; j++) gx[j] = (gh[j] - x[j] * rstd * c) * rstd;
}

/* One row: its first rd = 2h dims rotated, forward y1 = x1 c1 - x2 s1, y2 = x2 c2 + x1 s2; transpose (its
 * backward) y1 = x1 c1 + x2 s2, y2 = x2 c2 - x1 s1; dims rd..D copied (partial rotary). */
static void FN(rotary_row)(real *restrict y, const real *restrict x, const real *restrict c, const real *restrict s,
                           int transpose, int64_t D, int64_t rd)
{
    const int64_t h = rd / 2;
    if (!transpose)
        for (int64_t j = 0; j < h; j++) {
            y[j] = x[j] * c[j] - x[j + h] * s[j];
            y[j + h] = x[j + h] * c[j + h] + x[j] * s[j + h];
        }
    else
        for (int64_t j = 0; j < h; j++) {
            y[j] = x[j] * c[j] + x[j + h] * s[j + h];
            y[j + h] = x[j + h] * c[j + h] - x[j] * s[j];
        }
    if (rd < D) memcpy(y + rd, x + rd, sizeof(real) * (size_t)(D - rd));
}

#undef ivec
#undef SEL
#include "simd_vec_end.h"
