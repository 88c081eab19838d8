/* step_kernels.c: fused element-wise and row-wise ops of the training step, float32 and float64.
 *
 * Profiles of a LoRA step on SmolLM2 put these next after the matrix products: the SwiGLU gate
 * (NumPy needs five passes and three temporaries, and its float32 exp runs at ~3 ns an element
 * here) and the softmax of attention and of the LM head's cross-entropy (max, exp, sum and scale
 * of each row, plus a causal mask). Each function makes one or two passes over its rows.
 *
 *   silu_mul_forward / silu_mul_backward   the SwiGLU gate and its gradients
 *   softmax_rows                           scale * softmax of each row's visible prefix, and its log-sum-exp
 *   exp_rows                               exp(p - lse) of each row's visible prefix (backward's probabilities)
 *   attention_forward / attention_backward scaled-dot-product attention with grouped-query heads, a
 *                                          causal mask, a sliding window and a soft cap, one (batch,
 *                                          key/value head) per task: small register-tiled products, the
 *                                          scores never leave a block of rows
 *   rms_norm_forward / rms_norm_backward   RMSNorm over rows, and its gradients
 *   rotary                                 rotary embedding (rotate-half form, over the first rd of D
 *                                          dims) and its transpose
 * Each has a plain single-threaded loop beside it, name_ref (the end of step_kernels_impl.h): the C
 * reference csrc/test_step_kernels.c checks the same way.
 *
 * Rows and the causal limit: p is [rows, n]; row i sees its first
 *   vis(i) = clamp(count0 + (i % period) / group, 0, n)
 * columns; the others are set to 0. A plain softmax is count0 = n, group = period = 1; attention
 * with query positions t0.. of a causal mask (g query heads per key head stacked position-major,
 * S keys, T queries) is count0 = t0 + 1 + S - T, group = g, period = rows per head.
 *
 * Work is split by rows or by fixed chunks of elements (no reductions across threads), so results
 * are identical for any number of threads. No fast-math; the same AVX2 / baseline dispatch as
 * lora_kernels.c.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "lora_internal.h"
#include "lora_np.h"

#define ELEMENT_CHUNK 16384   /* elements per parallel chunk of the element-wise ops */
#define PARALLEL_WORK 100000  /* elements below which a call stays on one thread */

/* The sizes of one attention call (see step_kernels_simd.h); tb query positions per block. */
typedef struct {
    int64_t T, S, D, g, tb, window; /* window 0: none */
    int causal;
    double scale, softcap;          /* softcap 0: none */
} attn_dims;

#define ATTN_ROWS 48 /* query rows (positions x heads per key/value head) per block: a multiple of 6 */

#define SIMD_TEMPLATE "step_kernels_simd.h" /* name_f32_v3, name_f64_v3, name_f32_base, name_f64_base */
#include "instantiate.h"

static int64_t row_vis(int64_t i, int64_t n, int64_t period, int64_t count0, int64_t group)
{
    int64_t v = count0 + (i % period) / group;
    return v < 0 ? 0 : v > n ? n : v;
}

/* The keys [*lo, return) query position t sees: s > t + S - T - window (window > 0), s <= t + S - T (causal). */
static int64_t keys_seen(int64_t t, int64_t T, int64_t S, int causal, int64_t window, int64_t *lo)
{
    const int64_t hi = row_vis(t, S, T, causal ? 1 + S - T : S, 1), l = window ? t + S - T - window + 1 : 0;
    *lo = l < 0 ? 0 : l > hi ? hi : l;
    return hi;
}

static int bad_rotary(int64_t B, int64_t H, int64_t T, int64_t D, int64_t rd)
{
    return B < 0 || H < 0 || T < 0 || rd < 0 || rd % 2 || rd > D;
}

static int bad_rows(int64_t rows, int64_t n, int64_t period, int64_t group)
{
    return rows < 0 || n < 0 || period < 1 || group < 1;
}

#define TEMPLATE "step_kernels_impl.h" /* the public name_f32, name_f64 */
#include "instantiate.h"
