/* lora_kernels_impl.h: the body of lora_kernels.c for one element type.
 * lora_kernels.c includes it twice, with `real` = float, SFX = f32 and `real` = double,
 * SFX = f64, so each function below exists as name_f32 and name_f64.
 * Matrices are row-major; a shape comment names each argument's shape.
 */
#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)
#define FN(name) CAT(name, SFX)
#define VL ((int64_t)(VBYTES / sizeof(real)))

/* A SIMD vector of VL reals that may sit at any real-aligned address. */
typedef real FN(vec) __attribute__((vector_size(VBYTES), aligned(sizeof(real)), may_alias));
#define vec FN(vec)

ALWAYS_INLINE vec FN(load)(const real *p) { return *(const vec *)p; }
ALWAYS_INLINE void FN(store)(real *p, vec v) { *(vec *)p = v; }

ALWAYS_INLINE real FN(hsum)(vec v)
{
    real s = 0;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}

/* ---- rows_dot: T [M, R] = X [M, K] @ W [R, K]^T ------------------------------------- */

/* One tile of MB <= 2 rows of X against KB <= 4 rows of W (MB, KB compile-time constants).
 * T is [MB, KB] with row stride ldt; X is [MB, K] with row stride ldx; W is [KB, K], stride ldw. */
ALWAYS_INLINE void FN(dot_tile)(real *restrict T, int64_t ldt, const real *restrict X, int64_t ldx,
                                const real *restrict W, int64_t ldw, int64_t K, const int MB, const int KB)
{
    vec acc[2][4];
    for (int m = 0; m < MB; m++)
        for (int k = 0; k < KB; k++) acc[m][k] = (vec){0};
    int64_t i = 0;
    for (; i + VL <= K; i += VL) {
        vec xv[2];
        for (int m = 0; m < MB; m++) xv[m] = FN(load)(X + m * ldx + i);
        for (int k = 0; k < KB; k++) {
            vec w = FN(load)(W + k * ldw + i);
            for (int m = 0; m < MB; m++) acc[m][k] += xv[m] * w;
        }
    }
    for (int m = 0; m < MB; m++)
        for (int k = 0; k < KB; k++) {
            real s = FN(hsum)(acc[m][k]);
            for (int64_t j = i; j < K; j++) s += X[m * ldx + j] * W[k * ldw + j];
            T[m * ldt + k] = s;
        }
}

/* T [M, R] = X [M, K] @ W [R, K]^T; all three dense. */
ALWAYS_INLINE void FN(rows_dot)(real *restrict T, const real *restrict X, const real *restrict W,
                                int64_t M, int64_t K, int64_t R)
{
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) {
        int64_t k = 0;
        for (; k + 4 <= R; k += 4) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 2, 4);
        for (; k < R; k++) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 2, 1);
    }
    for (; m < M; m++) {
        int64_t k = 0;
        for (; k + 4 <= R; k += 4) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 1, 4);
        for (; k < R; k++) FN(dot_tile)(T + m * R + k, R, X + m * K, K, W + k * K, K, K, 1, 1);
    }
}

/* ---- rows_update: Y [M, K] += C [M, R] @ D [R, K] ----------------------------------- */

/* MB <= 4 rows of Y (row stride ldy); C[m, k] is C[m * csm + k * csk], so C may be a
 * transposed view; D is dense [R, K]. Each element adds its R terms in order k = 0..R-1. */
ALWAYS_INLINE void FN(update_tile)(real *restrict Y, int64_t ldy, const real *restrict C, int64_t csm,
                                   int64_t csk, const real *restrict D, int64_t K, int64_t R, const int MB)
{
    int64_t j = 0;
    for (; j + 2 * VL <= K; j += 2 * VL) {
        vec acc[4][2];
        for (int m = 0; m < MB; m++) {
            acc[m][0] = FN(load)(Y + m * ldy + j);
            acc[m][1] = FN(load)(Y + m * ldy + j + VL);
        }
        for (int64_t k = 0; k < R; k++) {
            vec d0 = FN(load)(D + k * K + j), d1 = FN(load)(D + k * K + j + VL);
            for (int m = 0; m < MB; m++) {
                real c = C[m * csm + k * csk];
                acc[m][0] += c * d0;
                acc[m][1] += c * d1;
            }
        }
        for (int m = 0; m < MB; m++) {
            FN(store)(Y + m * ldy + j, acc[m][0]);
            FN(store)(Y + m * ldy + j + VL, acc[m][1]);
        }
    }
    for (; j < K; j++)
        for (int m = 0; m < MB; m++) {
            real s = Y[m * ldy + j];
            for (int64_t k = 0; k < R; k++) s += C[m * csm + k * csk] * D[k * K + j];
            Y[m * ldy + j] = s;
        }
}

ALWAYS_INLINE void FN(rows_update)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                   const real *restrict D, int64_t M, int64_t K, int64_t R)
{
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) FN(update_tile)(Y + m * K, K, C + m * csm, csm, csk, D, K, R, 4);
    for (; m < M; m++) FN(update_tile)(Y + m * K, K, C + m * csm, csm, csk, D, K, R, 1);
}

/* ---- rows_reduce: P [R, K] += C [M, R]^T @ X [M, K] --------------------------------- */

/* KB <= 8 rows of P, VL columns (P row stride ldp); C is [M, KB] (row stride ldc); X is
 * [M, VL] (row stride ldx). Each element adds its M terms in order m = 0..M-1. */
ALWAYS_INLINE void FN(reduce_tile)(real *restrict P, int64_t ldp, const real *restrict C, int64_t ldc,
                                   const real *restrict X, int64_t ldx, int64_t M, const int KB)
{
    vec acc[8];
    for (int k = 0; k < KB; k++) acc[k] = FN(load)(P + k * ldp);
    for (int64_t m = 0; m < M; m++) {
        vec xv = FN(load)(X + m * ldx);
        for (int k = 0; k < KB; k++) acc[k] += C[m * ldc + k] * xv;
    }
    for (int k = 0; k < KB; k++) FN(store)(P + k * ldp, acc[k]);
}

ALWAYS_INLINE void FN(rows_reduce)(real *restrict P, const real *restrict C, const real *restrict X,
                                   int64_t M, int64_t K, int64_t R)
{
    /* The tiles below walk X down its columns, which the hardware prefetcher does not follow:
     * ask for the block's cache lines first, row by row. */
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < K; j += 64 / (int64_t)sizeof(real)) __builtin_prefetch(X + m * K + j);
    int64_t j = 0;
    for (; j + VL <= K; j += VL) {
        int64_t k = 0;
        for (; k + 8 <= R; k += 8) FN(reduce_tile)(P + k * K + j, K, C + k, R, X + j, K, M, 8);
        for (; k + 4 <= R; k += 4) FN(reduce_tile)(P + k * K + j, K, C + k, R, X + j, K, M, 4);
        for (; k < R; k++) FN(reduce_tile)(P + k * K + j, K, C + k, R, X + j, K, M, 1);
    }
    for (; j < K; j++)
        for (int64_t k = 0; k < R; k++) {
            real s = P[k * K + j];
            for (int64_t m = 0; m < M; m++) s += C[m * R + k] * X[m * K + j];
            P[k * K + j] = s;
        }
}

/* ---- per-block workers: the SIMD code, one clone per instruction set ------------------ */

/* M token rows: t [M, r] = x [M, in] @ lora_A^T;  y [M, out] += t @ sBt, sBt = scaling * lora_B^T [r, out]. */
LORA_CLONES static void FN(forward_block)(real *restrict y, real *restrict t, const real *restrict x,
                                          const real *restrict lora_A, const real *restrict sBt,
                                          int64_t M, int64_t in, int64_t out, int64_t r)
{
    FN(rows_dot)(t, x, lora_A, M, in, r);
    FN(rows_update)(y, t, r, 1, sBt, M, out, r);
}

/* M token rows of backward. g [M, r] = dy [M, out] @ Bt^T (Bt = lora_B^T [r, out]);
 * dx [M, in] += g @ sA (sA = scaling * lora_A); Pa [r, in] += g^T @ x; Pb [r, out] += t^T @ dy.
 * NULL outputs are skipped; g is scratch, needed when dx or Pa is. */
LORA_CLONES static void FN(backward_block)(real *restrict dx, real *restrict Pa, real *restrict Pb,
                                           real *restrict g, const real *restrict dy,
                                           const real *restrict x, const real *restrict t,
                                           const real *restrict Bt, const real *restrict sA,
                                           int64_t M, int64_t in, int64_t out, int64_t r)
{
    if (g) FN(rows_dot)(g, dy, Bt, M, out, r);
    if (dx) FN(rows_update)(dx, g, r, 1, sA, M, in, r);
    if (Pa) FN(rows_reduce)(Pa, g, x, M, in, r);
    if (Pb) FN(rows_reduce)(Pb, t, dy, M, out, r);
}

LORA_CLONES static void FN(update_block)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                         const real *restrict D, int64_t M, int64_t K, int64_t R)
{
    FN(rows_update)(Y, C, csm, csk, D, M, K, R);
}

/* dst [r, n] = scale * src^T, src [n, r]: the small transposed copies of lora_B. */
static void FN(transpose_scaled)(real *restrict dst, const real *restrict src, real scale, int64_t n, int64_t r)
{
    for (int64_t k = 0; k < r; k++)
        for (int64_t o = 0; o < n; o++) dst[k * n + o] = scale * src[o * r + k];
}

static real *FN(alloc)(int64_t count) { return malloc(sizeof(real) * (size_t)(count > 0 ? count : 1)); }

/* ---- public, tiled and parallel ------------------------------------------------------ */

int FN(lora_forward)(real *y, real *t, const real *x, const real *lora_A, const real *lora_B,
                     double scaling, int64_t N, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r) || !y || !t || !x || !lora_A || !lora_B) return LORA_EINVAL;
    real *sBt = FN(alloc)(r * out);
    if (!sBt) return LORA_ENOMEM;
    FN(transpose_scaled)(sBt, lora_B, (real)scaling, out, r);
    int64_t n_blocks = (N + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (N * r * (in + out) > PARALLEL_WORK)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t m0 = b * ROWS, M = min64(ROWS, N - m0);
        FN(forward_block)(y + m0 * out, t + m0 * r, x + m0 * in, lora_A, sBt, M, in, out, r);
    }
    free(sBt);
    return LORA_OK;
}

int FN(lora_backward)(real *dx, real *d_lora_A, real *d_lora_B, const real *dy, const real *x,
                      const real *t, const real *lora_A, const real *lora_B, double scaling,
                      int64_t N, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r) || !dy || !x || !t || !lora_A || !lora_B) return LORA_EINVAL;
    const real s = (real)scaling;
    const int64_t n_c = n_chunks(N);
    const int need_g = dx || d_lora_A;
    /* Bt = lora_B^T [r, out]; sA = s * lora_A [r, in]; g: per-chunk [ROWS, r] scratch;
     * Pa [n_c, r, in] and Pb [n_c, r, out]: per-chunk partial sums over tokens. */
    real *Bt = need_g ? FN(alloc)(r * out) : NULL;
    real *sA = dx ? FN(alloc)(r * in) : NULL;
    real *g = need_g ? FN(alloc)(n_c * ROWS * r) : NULL;
    real *Pa = d_lora_A ? calloc((size_t)(n_c * r * in + 1), sizeof(real)) : NULL;
    real *Pb = d_lora_B ? calloc((size_t)(n_c * r * out + 1), sizeof(real)) : NULL;
    if ((need_g && (!Bt || !g)) || (dx && !sA) || (d_lora_A && !Pa) || (d_lora_B && !Pb)) {
        free(Bt), free(sA), free(g), free(Pa), free(Pb);
        return LORA_ENOMEM;
    }
    if (Bt) FN(transpose_scaled)(Bt, lora_B, 1, out, r);
    if (sA)
        for (int64_t j = 0; j < r * in; j++) sA[j] = s * lora_A[j];

#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (2 * N * r * (in + out) > PARALLEL_WORK)
    for (int64_t c = 0; c < n_c; c++) {
        for (int64_t m0 = c * N / n_c, m_end = (c + 1) * N / n_c; m0 < m_end; m0 += ROWS) {
            int64_t M = min64(ROWS, m_end - m0);
            FN(backward_block)(dx ? dx + m0 * in : NULL, Pa ? Pa + c * r * in : NULL,
                               Pb ? Pb + c * r * out : NULL, g ? g + c * ROWS * r : NULL,
                               dy + m0 * out, x + m0 * in, t + m0 * r, Bt, sA, M, in, out, r);
        }
    }

    /* Sum the chunks in order c = 0..n_c-1 into chunk 0, then scale into the gradients. */
    if (Pa) {
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (n_c * r * in > PARALLEL_WORK)
        for (int64_t k = 0; k < r; k++) {
            real *p0 = Pa + k * in;
            for (int64_t c = 1; c < n_c; c++)
                for (int64_t i = 0; i < in; i++) p0[i] += Pa[(c * r + k) * in + i];
            for (int64_t i = 0; i < in; i++) d_lora_A[k * in + i] += s * p0[i];
        }
    }
    if (Pb) {
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (n_c * r * out > PARALLEL_WORK)
        for (int64_t k = 0; k < r; k++) {
            real *p0 = Pb + k * out;
            for (int64_t c = 1; c < n_c; c++)
                for (int64_t o = 0; o < out; o++) p0[o] += Pb[(c * r + k) * out + o];
        }
        for (int64_t o = 0; o < out; o++)
            for (int64_t k = 0; k < r; k++) d_lora_B[o * r + k] += s * Pb[k * out + o];
    }
    free(Bt), free(sA), free(g), free(Pa), free(Pb);
    return LORA_OK;
}

int FN(lora_merge)(real *weight, const real *lora_A, const real *lora_B, double scaling,
                   int fan_in_fan_out, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(0, in, out, r) || !weight || !lora_A || !lora_B) return LORA_EINVAL;
    const real s = (real)scaling;
    /* weight [rows, cols] += C [rows, r] @ D [r, cols] with, for weight [out, in]:
     * C = lora_B, D = s * lora_A; for fan_in_fan_out, weight [in, out]: C = lora_A^T, D = s * lora_B^T. */
    const int64_t rows = fan_in_fan_out ? in : out, cols = fan_in_fan_out ? out : in;
    const int64_t csm = fan_in_fan_out ? 1 : r, csk = fan_in_fan_out ? in : 1;
    const real *C = fan_in_fan_out ? lora_A : lora_B;
    real *D = FN(alloc)(r * cols);
    if (!D) return LORA_ENOMEM;
    if (fan_in_fan_out)
        FN(transpose_scaled)(D, lora_B, s, out, r);
    else
        for (int64_t j = 0; j < r * in; j++) D[j] = s * lora_A[j];
    int64_t n_blocks = (rows + ROWS - 1) / ROWS;
#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (rows * cols * r > PARALLEL_WORK)
    for (int64_t b = 0; b < n_blocks; b++) {
        int64_t m0 = b * ROWS, M = min64(ROWS, rows - m0);
        FN(update_block)(weight + m0 * cols, C + m0 * csm, csm, csk, D, M, cols, r);
    }
    free(D);
    return LORA_OK;
}

/* ---- public, plain reference loops --------------------------------------------------- */

int FN(lora_forward_ref)(real *y, real *t, const real *x, const real *lora_A, const real *lora_B,
                         double scaling, int64_t N, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r) || !y || !t || !x || !lora_A || !lora_B) return LORA_EINVAL;
    const real s = (real)scaling;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < r; k++) {
            real acc = 0;
            for (int64_t i = 0; i < in; i++) acc += x[n * in + i] * lora_A[k * in + i];
            t[n * r + k] = acc;
        }
        for (int64_t o = 0; o < out; o++) {
            real acc = 0;
            for (int64_t k = 0; k < r; k++) acc += t[n * r + k] * lora_B[o * r + k];
            y[n * out + o] += s * acc;
        }
    }
    return LORA_OK;
}

int FN(lora_backward_ref)(real *dx, real *d_lora_A, real *d_lora_B, const real *dy, const real *x,
                          const real *t, const real *lora_A, const real *lora_B, double scaling,
                          int64_t N, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r) || !dy || !x || !t || !lora_A || !lora_B) return LORA_EINVAL;
    const real s = (real)scaling;
    real *g = FN(alloc)(r); /* g [r] = dy[n] @ lora_B, one token at a time */
    if (!g) return LORA_ENOMEM;
    for (int64_t n = 0; n < N; n++) {
        for (int64_t k = 0; k < r; k++) {
            real acc = 0;
            for (int64_t o = 0; o < out; o++) acc += dy[n * out + o] * lora_B[o * r + k];
            g[k] = acc;
        }
        if (dx)
            for (int64_t i = 0; i < in; i++) {
                real acc = 0;
                for (int64_t k = 0; k < r; k++) acc += g[k] * lora_A[k * in + i];
                dx[n * in + i] += s * acc;
            }
        if (d_lora_A)
            for (int64_t k = 0; k < r; k++)
                for (int64_t i = 0; i < in; i++) d_lora_A[k * in + i] += s * g[k] * x[n * in + i];
        if (d_lora_B)
            for (int64_t o = 0; o < out; o++)
                for (int64_t k = 0; k < r; k++) d_lora_B[o * r + k] += s * dy[n * out + o] * t[n * r + k];
    }
    free(g);
    return LORA_OK;
}

int FN(lora_merge_ref)(real *weight, const real *lora_A, const real *lora_B, double scaling,
                       int fan_in_fan_out, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(0, in, out, r) || !weight || !lora_A || !lora_B) return LORA_EINVAL;
    const real s = (real)scaling;
    for (int64_t o = 0; o < out; o++)
        for (int64_t i = 0; i < in; i++) {
            real acc = 0;
            for (int64_t k = 0; k < r; k++) acc += lora_B[o * r + k] * lora_A[k * in + i];
            weight[fan_in_fan_out ? i * out + o : o * in + i] += s * acc;
        }
    return LORA_OK;
}

#undef vec
#undef VL
#undef FN
#undef CAT
#undef CAT_
