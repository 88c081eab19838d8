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

/* D is packed by column tiles of JW = 2 * VL: tile jt holds D[0..R, jt*JW .. jt*JW + JW) as R
 * contiguous rows of JW, so a tile's R rows are one sequential read whatever K is (rows of D a
 * power of two apart would otherwise fall into the same cache sets); the K % JW last columns
 * follow as a dense [R, K % JW] block. pack_scaled writes this layout. */
#define JW (2 * VL)

/* Dp = scale * S packed as above, where S (k, j) = src[k * sk + j * sj] for k < R, j < K. */
static void FN(pack_scaled)(real *restrict Dp, const real *restrict src, int64_t sk, int64_t sj, real scale,
                            int64_t R, int64_t K)
{
    const int64_t full = K / JW * JW, tail = K - full;
    for (int64_t k = 0; k < R; k++) {
        for (int64_t j = 0; j < full; j++) Dp[(j / JW * R + k) * JW + j % JW] = scale * src[k * sk + j * sj];
        for (int64_t j = full; j < K; j++) Dp[full * R + k * tail + (j - full)] = scale * src[k * sk + j * sj];
    }
}

/* MB <= 4 rows of Y (row stride ldy); C[m, k] is C[m * csm + k * csk], so C may be a
 * transposed view; Dp is D [R, K] packed. Each element adds its R terms in order k = 0..R-1. */
ALWAYS_INLINE void FN(update_tile)(real *restrict Y, int64_t ldy, const real *restrict C, int64_t csm,
                                   int64_t csk, const real *restrict Dp, int64_t K, int64_t R, const int MB)
{
    const int64_t full = K / JW * JW, tail = K - full;
    for (int64_t j = 0; j < full; j += JW) {
        const real *d = Dp + j * R;
        vec acc[4][2];
        for (int m = 0; m < MB; m++) {
            acc[m][0] = FN(load)(Y + m * ldy + j);
            acc[m][1] = FN(load)(Y + m * ldy + j + VL);
        }
        for (int64_t k = 0; k < R; k++) {
            vec d0 = FN(load)(d + k * JW), d1 = FN(load)(d + k * JW + VL);
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
    for (int64_t j = full; j < K; j++)
        for (int m = 0; m < MB; m++) {
            real s = Y[m * ldy + j];
            for (int64_t k = 0; k < R; k++) s += C[m * csm + k * csk] * Dp[full * R + k * tail + (j - full)];
            Y[m * ldy + j] = s;
        }
}

ALWAYS_INLINE void FN(rows_update)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                   const real *restrict Dp, int64_t M, int64_t K, int64_t R)
{
    int64_t m = 0;
    for (; m + 4 <= M; m += 4) FN(update_tile)(Y + m * K, K, C + m * csm, csm, csk, Dp, K, R, 4);
    for (; m < M; m++) FN(update_tile)(Y + m * K, K, C + m * csm, csm, csk, Dp, K, R, 1);
}

/* ---- rows_reduce: P [R, W] += C [M, R]^T @ X [M, W] --------------------------------- */

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

/* P [R, W] (row stride ldp) += C [M, R]^T @ X [M, W] (row stride ldx); C is dense.
 * The tiles walk X down its columns. Rows of X a power of two apart share cache sets and the
 * prefetcher does not follow that walk, so the block's full column tiles are first copied, row
 * by row, into `packed` [W / VL][M][VL] (M * W reals), which the tiles then read in order. */
ALWAYS_INLINE void FN(rows_reduce)(real *restrict P, int64_t ldp, const real *restrict C, const real *restrict X,
                                   int64_t ldx, int64_t M, int64_t W, int64_t R, real *restrict packed)
{
    const int64_t full = W / VL * VL;
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < full; j += VL) FN(store)(packed + (j * M + m * VL), FN(load)(X + m * ldx + j));
    for (int64_t j = 0; j < full; j += VL) {
        const real *xp = packed + j * M;
        int64_t k = 0;
        for (; k + 8 <= R; k += 8) FN(reduce_tile)(P + k * ldp + j, ldp, C + k, R, xp, VL, M, 8);
        for (; k + 4 <= R; k += 4) FN(reduce_tile)(P + k * ldp + j, ldp, C + k, R, xp, VL, M, 4);
        for (; k < R; k++) FN(reduce_tile)(P + k * ldp + j, ldp, C + k, R, xp, VL, M, 1);
    }
    for (int64_t j = full; j < W; j++)
        for (int64_t k = 0; k < R; k++) {
            real s = P[k * ldp + j];
            for (int64_t m = 0; m < M; m++) s += C[m * R + k] * X[m * ldx + j];
            P[k * ldp + j] = s;
        }
}

/* ---- per-block workers: the SIMD code, one clone per instruction set ------------------ */

/* M token rows: t [M, r] = x [M, in] @ lora_A^T;  y [M, out] += t @ sBt, sBt = scaling * lora_B^T [r, out] packed. */
LORA_CLONES static void FN(forward_block)(real *restrict y, real *restrict t, const real *restrict x,
                                          const real *restrict lora_A, const real *restrict sBt,
                                          int64_t M, int64_t in, int64_t out, int64_t r)
{
    FN(rows_dot)(t, x, lora_A, M, in, r);
    FN(rows_update)(y, t, r, 1, sBt, M, out, r);
}

/* Backward, first pass over M token rows: g [M, r] = dy [M, out] @ Bt^T (Bt = lora_B^T [r, out]);
 * dx [M, in] += g @ sA (sA = scaling * lora_A, packed), skipped when dx is NULL. */
LORA_CLONES static void FN(backward_rows)(real *restrict dx, real *restrict g, const real *restrict dy,
                                          const real *restrict Bt, const real *restrict sA,
                                          int64_t M, int64_t in, int64_t out, int64_t r)
{
    FN(rows_dot)(g, dy, Bt, M, out, r);
    if (dx) FN(rows_update)(dx, g, r, 1, sA, M, in, r);
}

/* Backward, second pass: P [r, W] (row stride ldp) += C [M, r]^T @ X [M, W] (row stride ldx). */
LORA_CLONES static void FN(reduce_block)(real *restrict P, int64_t ldp, const real *restrict C,
                                         const real *restrict X, int64_t ldx, int64_t M, int64_t W, int64_t r,
                                         real *restrict packed)
{
    FN(rows_reduce)(P, ldp, C, X, ldx, M, W, r, packed);
}

/* P [r, K] += C [M, r]^T @ X [M, K] over one chunk of M tokens, in column panels (at most
 * PANEL_COLS wide) whose slice of P (about PANEL_BYTES) stays in cache while the chunk's
 * ROWS-row blocks stream by: P is not re-read from memory for every block however large r * K.
 * packed: ROWS * PANEL_COLS reals of scratch. */
static void FN(reduce_chunk)(real *P, const real *C, const real *X, int64_t M, int64_t K, int64_t r, real *packed)
{
    int64_t width = min64(PANEL_COLS, PANEL_BYTES / (r * (int64_t)sizeof(real)) / VL * VL);
    if (width < VL) width = VL;
    for (int64_t j0 = 0; j0 < K; j0 += width)
        for (int64_t m0 = 0; m0 < M; m0 += ROWS)
            FN(reduce_block)(P + j0, K, C + m0 * r, X + m0 * K + j0, K, min64(ROWS, M - m0), min64(width, K - j0),
                             r, packed);
}

LORA_CLONES static void FN(update_block)(real *restrict Y, const real *restrict C, int64_t csm, int64_t csk,
                                         const real *restrict Dp, int64_t M, int64_t K, int64_t R)
{
    FN(rows_update)(Y, C, csm, csk, Dp, M, K, R);
}

/* dst [r, n] = src^T, src [n, r]: the dense transposed copy of lora_B that rows_dot reads. */
static void FN(transpose)(real *restrict dst, const real *restrict src, int64_t n, int64_t r)
{
    for (int64_t k = 0; k < r; k++)
        for (int64_t o = 0; o < n; o++) dst[k * n + o] = src[o * r + k];
}

static real *FN(alloc)(int64_t count) { return malloc(sizeof(real) * (size_t)(count > 0 ? count : 1)); }

/* ---- public, tiled and parallel ------------------------------------------------------ */

int FN(lora_forward)(real *y, real *t, const real *x, const real *lora_A, const real *lora_B,
                     double scaling, int64_t N, int64_t in, int64_t out, int64_t r)
{
    if (bad_sizes(N, in, out, r) || !y || !t || !x || !lora_A || !lora_B) return LORA_EINVAL;
    real *sBt = FN(alloc)(r * out);
    if (!sBt) return LORA_ENOMEM;
    FN(pack_scaled)(sBt, lora_B, 1, r, (real)scaling, r, out);
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
    if (N == 0 || r == 0) return LORA_OK; /* every gradient gets a sum of no terms */
    const real s = (real)scaling;
    const int64_t n_c = n_chunks(N);
    const int need_g = dx || d_lora_A;
    /* Bt = lora_B^T [r, out]; sA = s * lora_A [r, in]; g = dy @ lora_B [N, r];
     * Pa [n_c, r, in] and Pb [n_c, r, out]: per-chunk partial sums over tokens. */
    real *Bt = need_g ? FN(alloc)(r * out) : NULL;
    real *sA = dx ? FN(alloc)(r * in) : NULL;
    real *g = need_g ? FN(alloc)(N * r) : NULL;
    real *Pa = d_lora_A ? calloc((size_t)(n_c * r * in + 1), sizeof(real)) : NULL;
    real *Pb = d_lora_B ? calloc((size_t)(n_c * r * out + 1), sizeof(real)) : NULL;
    real *packed = d_lora_A || d_lora_B ? FN(alloc)(n_c * ROWS * PANEL_COLS) : NULL;
    if ((need_g && (!Bt || !g)) || (dx && !sA) || (d_lora_A && !Pa) || (d_lora_B && !Pb) ||
        ((d_lora_A || d_lora_B) && !packed)) {
        free(Bt), free(sA), free(g), free(Pa), free(Pb), free(packed);
        return LORA_ENOMEM;
    }
    if (Bt) FN(transpose)(Bt, lora_B, out, r);
    if (sA) FN(pack_scaled)(sA, lora_A, in, 1, s, r, in);

#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (2 * N * r * (in + out) > PARALLEL_WORK)
    for (int64_t c = 0; c < n_c; c++) {
        const int64_t m_begin = c * N / n_c, m_end = (c + 1) * N / n_c, M = m_end - m_begin;
        for (int64_t m0 = m_begin; need_g && m0 < m_end; m0 += ROWS)
            FN(backward_rows)(dx ? dx + m0 * in : NULL, g + m0 * r, dy + m0 * out, Bt, sA,
                              min64(ROWS, m_end - m0), in, out, r);
        real *pack_c = packed ? packed + c * ROWS * PANEL_COLS : NULL;
        if (Pb) FN(reduce_chunk)(Pb + c * r * out, t + m_begin * r, dy + m_begin * out, M, out, r, pack_c);
        if (Pa) FN(reduce_chunk)(Pa + c * r * in, g + m_begin * r, x + m_begin * in, M, in, r, pack_c);
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
    free(Bt), free(sA), free(g), free(Pa), free(Pb), free(packed);
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
        FN(pack_scaled)(D, lora_B, 1, r, s, r, out);
    else
        FN(pack_scaled)(D, lora_A, in, 1, s, r, in);
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

#undef JW
#undef vec
#undef VL
#undef FN
#undef CAT
#undef CAT_
