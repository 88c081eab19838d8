/* quant_kernels.c: GEMMs whose weight stays in GGUF's quantized blocks (quant.h), C11 + OpenMP.
 *
 * Forward y = x W^T (+ bias) and backward dx = dy W, W [N, K] in ggml blocks. Both go through one
 * register-tiled micro-kernel, C [MR rows, 2 vectors] += A [MR, L] @ B [L, 2 vectors], fed by a
 * panel of W dequantized into cache (quant_kernels_simd.h):
 *   forward  (M > 8)  panel B = W[n0:n0+NT, k0:k0+KT]^T  [KT, NT]: 64 output features x 256 k;
 *   backward          panel B = W[n0:n0+NT, k0:k0+KT]    [NT, KT]: 64 features x 256 output k.
 * Work is split by output tiles (a block of at most MBLK rows x one column tile), so OpenMP needs
 * no atomics, and each output element is summed in an order fixed by the sizes alone: results are
 * bit-identical for any number of threads. A block of W is dequantized once per block of rows.
 * Forward with M <= 8 rows (decoding) reads each weight row once and dots it with every row of x: in
 * the AVX2 build 32 weights at a time, dequantized into registers and fed straight to the multiply-adds
 * (no buffer, no scratch memory, one thread below PARALLEL_WORK); in the baseline build a superblock at a
 * time into a buffer in L1.
 *
 * Dequantization is exact: each value is computed with ggml's float32 operations in ggml's order
 * (where a min is added, d * q is exact, so a fused multiply-add changes nothing), so a tile equals
 * gguf-py's (and lora_np.gguf's) dequantization bit for bit, and the float64 kernels see the same
 * weights widened. float64 activations accumulate in float64.
 *
 * SIMD: GCC/Clang vector extensions, built for AVX2 + FMA and for the baseline and picked at run
 * time, as in lora_kernels.c (instantiate.h; QSIMD() below: SIMD() of lora_internal.h, also asking for F16C).
 */
#include <stdlib.h>
#include <string.h>

#include "quant.h"
#include "lora_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef LORA_V3
#include <immintrin.h>
#endif

#define NT 64              /* output features (forward) or summed features (backward) per panel */
#define KT 256             /* k per panel: one K-quant superblock, eight 32-element blocks */
#define MBLK 256           /* rows of x or dy per task: a panel is dequantized once per block of rows */
#define DECODE_ROWS 8      /* forward with at most this many rows takes the decode path */
#define PARALLEL_WORK 200000 /* multiply-adds below which a call stays on one thread */

/* ggml's block layouts (ggml-common.h): elements and bytes per block. */
static int64_t block_bytes(int type)
{
    switch (type) {
    case QUANT_F32: return 4;
    case QUANT_F16: case QUANT_BF16: return 2;
    case QUANT_Q4_0: return 18;
    case QUANT_Q4_1: return 20;
    case QUANT_Q5_0: return 22;
    case QUANT_Q5_1: return 24;
    case QUANT_Q8_0: return 34;
    case QUANT_Q4_K: return 144;
    case QUANT_Q5_K: return 176;
    case QUANT_Q6_K: return 210;
    default: return 0;
    }
}

int64_t quant_block_size(int type)
{
    switch (type) {
    case QUANT_F32: case QUANT_F16: case QUANT_BF16: return 1;
    case QUANT_Q4_0: case QUANT_Q4_1: case QUANT_Q5_0: case QUANT_Q5_1: case QUANT_Q8_0: return 32;
    case QUANT_Q4_K: case QUANT_Q5_K: case QUANT_Q6_K: return 256;
    default: return 0;
    }
}

int64_t quant_row_bytes(int type, int64_t K)
{
    const int64_t bs = quant_block_size(type);
    return bs == 0 || K < 0 || K % bs ? 0 : K / bs * block_bytes(type);
}

/* The checks every public function makes: a known type, sizes >= 0, K whole blocks. */
static int bad_call(int type, int64_t M, int64_t N, int64_t K)
{
    return quant_block_size(type) == 0 || M < 0 || N < 0 || K < 0 || K % quant_block_size(type) != 0;
}

/* IEEE half -> float, exactly (subnormals, infinities and NaNs included), without branches so that
 * loops over halves vectorize. */
static inline float half_to_float(const uint8_t *p)
{
    const uint32_t h = (uint32_t)p[0] | (uint32_t)p[1] << 8, exp = h >> 10 & 0x1f, mant = h & 0x3ff;
    const uint32_t bits = exp == 0x1f ? 0x7f800000u | mant << 13 : (exp + 112) << 23 | mant << 13;
    float f;
    memcpy(&f, &bits, sizeof f);
    f = exp == 0 ? (float)mant * 5.9604644775390625e-8f : f; /* zero or subnormal: mant 2^-24, exact */
    return h & 0x8000 ? -f : f;
}

static inline uint32_t load_u32(const uint8_t *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes (get_scale_min_k4). */
static inline void scale_min_k4(int j, const uint8_t *q, uint8_t *sc, uint8_t *mn)
{
    if (j < 4) {
        *sc = q[j] & 63;
        *mn = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *mn = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* QSIMD(name): SIMD(name) for these kernels, whose AVX2 build also converts halves with F16C (x86-64-v3
 * has it with AVX2 and FMA; checked all the same). */
#ifdef LORA_V3
static int use_v3(void)
{
    static int use = -1;
    if (use < 0) use = lora_np_use_v3() && __builtin_cpu_supports("f16c");
    return use;
}
#define QSIMD(name) (use_v3() ? CAT(name, CAT(SFX, v3)) : CAT(name, CAT(SFX, base)))
#else
#define QSIMD(name) CAT(name, CAT(SFX, base))
#endif

#define SIMD_TEMPLATE "quant_kernels_simd.h" /* name_f32_v3, name_f64_v3, name_f32_base, name_f64_base */
#include "instantiate.h"
#define TEMPLATE "quant_kernels_impl.h" /* the public name_f32, name_f64 */
#include "instantiate.h"
