/* lora_kernels_impl.h: the public functions of lora_kernels.c for one element type.
 * lora_kernels.c instantiates it (instantiate.h) with `real` = float, SFX = f32 and `real` = double,
 * SFX = f64, so each function below exists as name_f32 and name_f64. SIMD(name) is the
 * per-block worker of lora_kernels_simd.h for the instruction set this CPU has.
 */

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
    SIMD(pack_scaled)(sBt, lora_B, 1, r, (real)scaling, r, out);
    const int64_t n_blocks = (N + ROWS - 1) / ROWS, group = group_blocks(n_blocks);
#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (N * r * (in + out) > PARALLEL_WORK)
    for (int64_t b0 = 0; b0 < n_blocks; b0 += group)
        for (int64_t b = b0; b < min64(b0 + group, n_blocks); b++) {
            const int64_t m0 = b * ROWS, M = min64(ROWS, N - m0);
            const int64_t pf = b + 1 < min64(b0 + group, n_blocks) ? ROWS : 0;
            SIMD(forward_block)(y + m0 * out, t + m0 * r, x + m0 * in, lora_A, sBt, M, in, out, r, pf);
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
    const int64_t n_c = n_chunks(N), block = bwd_rows(in, out, sizeof(real));
    const int64_t group = bwd_group(block, in, out, r, sizeof(real));
    const int need_g = dx || d_lora_A;
    /* Bt = lora_B^T [r, out]; sA = s * lora_A [r, in]; g = dy @ lora_B [N, r];
     * Pa [n_c, r, in] and Pb [n_c, r, out]: per-chunk partial sums over tokens. */
    real *Bt = need_g ? FN(alloc)(r * out) : NULL;
    real *sA = dx ? FN(alloc)(r * in) : NULL;
    real *g = need_g ? FN(alloc)(N * r) : NULL;
    real *Pa = d_lora_A ? calloc((size_t)(n_c * r * in + 1), sizeof(real)) : NULL;
    real *Pb = d_lora_B ? calloc((size_t)(n_c * r * out + 1), sizeof(real)) : NULL;
    if ((need_g && (!Bt || !g)) || (dx && !sA) || (d_lora_A && !Pa) || (d_lora_B && !Pb)) {
        free(Bt), free(sA), free(g), free(Pa), free(Pb);
        return LORA_ENOMEM;
    }
    if (Bt) FN(transpose)(Bt, lora_B, out, r);
    if (sA) SIMD(pack_scaled)(sA, lora_A, in, 1, s, r, in);

#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (2 * N * r * (in + out) > PARALLEL_WORK)
    for (int64_t c = 0; c < n_c; c++) {
        const int64_t m_begin = c * N / n_c, m_end = (c + 1) * N / n_c;
        real *Pa_c = Pa ? Pa + c * r * in : NULL, *Pb_c = Pb ? Pb + c * r * out : NULL;
        /* Groups of rows (at most ROWS), each used while it is in cache: dy is read from memory
         * once. First g and dx, in smaller blocks (each prefetching the next one's dy and dx),
         * then the group's terms of the two sums over tokens, which prefetch the next group's dy
         * and x while they compute from cache. The partial sums still add the tokens in order,
         * as in a chunk-wide pass. */
        for (int64_t g0 = m_begin; g0 < m_end; g0 += group) {
            const int64_t g_end = min64(g0 + group, m_end);
            if (need_g)
                for (int64_t m0 = g0; m0 < g_end; m0 += block) {
                    const int64_t rows = min64(block, g_end - m0), pf = m0 + rows < m_end ? block : 0;
                    SIMD(backward_rows)(dx ? dx + m0 * in : NULL, g + m0 * r, dy + m0 * out, Bt, sA, rows, in, out,
                                        r, pf);
                }
            const int64_t pf = g_end < m_end ? group : 0; /* the next group's dy and x */
            if (Pb_c) SIMD(reduce_rows)(Pb_c, t + g0 * r, dy + g0 * out, g_end - g0, out, r, pf);
            if (Pa_c) SIMD(reduce_rows)(Pa_c, g + g0 * r, x + g0 * in, g_end - g0, in, r, pf);
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
        SIMD(pack_scaled)(D, lora_B, 1, r, s, r, out);
    else
        SIMD(pack_scaled)(D, lora_A, in, 1, s, r, in);
    const int64_t n_blocks = (rows + ROWS - 1) / ROWS, group = group_blocks(n_blocks);
#pragma omp parallel for schedule(dynamic) num_threads(lora_get_num_threads()) if (rows * cols * r > PARALLEL_WORK)
    for (int64_t b0 = 0; b0 < n_blocks; b0 += group)
        for (int64_t b = b0; b < min64(b0 + group, n_blocks); b++) {
            const int64_t m0 = b * ROWS, M = min64(ROWS, rows - m0);
            const int64_t pf = b + 1 < min64(b0 + group, n_blocks) ? ROWS : 0;
            SIMD(update_block)(weight + m0 * cols, C + m0 * csm, csm, csk, D, M, cols, r, pf);
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

