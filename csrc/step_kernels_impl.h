/* step_kernels_impl.h: the public functions of step_kernels.c for one element type (`real`,
 * SFX = f32 or f64). SIMD(name) is the worker of step_kernels_simd.h for this CPU. */

int FN(silu_mul_forward)(real *out, const real *a, const real *b, int64_t n)
{
    if (n < 0 || !out || !a || !b) return LORA_EINVAL;
    int64_t n_chunks = (n + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (n > PARALLEL_WORK)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t i = c * ELEMENT_CHUNK, m = n - i < ELEMENT_CHUNK ? n - i : ELEMENT_CHUNK;
        SIMD(silu_mul_fwd)(out + i, a + i, b + i, m);
    }
    return LORA_OK;
}

int FN(silu_mul_backward)(real *ga, real *gb, const real *g, const real *a, const real *b, int64_t n)
{
    if (n < 0 || !g || !a || (ga && !b)) return LORA_EINVAL;
    if (!ga && !gb) return LORA_OK;
    int64_t n_chunks = (n + ELEMENT_CHUNK - 1) / ELEMENT_CHUNK;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (n > PARALLEL_WORK)
    for (int64_t c = 0; c < n_chunks; c++) {
        int64_t i = c * ELEMENT_CHUNK, m = n - i < ELEMENT_CHUNK ? n - i : ELEMENT_CHUNK;
        SIMD(silu_mul_bwd)(ga ? ga + i : NULL, gb ? gb + i : NULL, g + i, a + i, b ? b + i : NULL, m);
    }
    return LORA_OK;
}

int FN(softmax_rows)(real *p, real *lse, double scale, int64_t rows, int64_t n, int64_t period, int64_t count0,
                     int64_t group)
{
    if (bad_rows(rows, n, period, group) || !p || !lse) return LORA_EINVAL;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++)
        SIMD(softmax_row)(p + i * n, lse + i, (real)scale, row_vis(i, n, period, count0, group), n);
    return LORA_OK;
}

int FN(exp_rows)(real *p, const real *lse, int64_t rows, int64_t n, int64_t period, int64_t count0, int64_t group)
{
    if (bad_rows(rows, n, period, group) || !p || !lse) return LORA_EINVAL;
#pragma omp parallel for schedule(static) num_threads(lora_get_num_threads()) if (rows * n > PARALLEL_WORK)
    for (int64_t i = 0; i < rows; i++) SIMD(exp_row)(p + i * n, lse[i], row_vis(i, n, period, count0, group), n);
    return LORA_OK;
}
