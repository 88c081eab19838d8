/* lora_kernels.c: the low-rank branch of LoRA in C11 + OpenMP, float32 and float64.
 *
 * The branch is memory-bound: x, y, dy and dx are [N, in] or [N, out] while r is small.
 * Each function therefore streams those big arrays in blocks of rows that stay in cache
 * while every use of the block is made, and keeps the small matrices (lora_A, lora_B, their
 * scaled or transposed copies) in cache. While a thread computes one block it prefetches the
 * next one it will take (software prefetch, in step with its own reads: the hardware
 * prefetchers lose track of the short, interleaved row streams), so that memory and
 * arithmetic overlap.
 *
 * Three tiled building blocks do all the arithmetic (lora_kernels_simd.h):
 *   rows_dot     T [M, R]  = X [M, K] @ W [R, K]^T     (t = x A^T, g = dy B)
 *   rows_update  Y [M, K] += C [M, R] @ D [R, K]       (y, dx, merge)
 *   rows_reduce  P [R, K] += C [M, R]^T @ X [M, K]     (d_lora_A, d_lora_B: sums over tokens)
 * Forward is rows_dot then rows_update on each block of ROWS rows. Backward takes each chunk
 * of tokens in groups of rows (bwd_group), each used while it is in cache: g = dy B and
 * dx += s g A in blocks of about BWD_BYTES of dy and dx (bwd_rows), then the group's terms of
 * the chunk's two sums over tokens, which read the group in place, in column panels.
 * rows_update reads D packed by column tiles (rows a power of two apart would otherwise all
 * land in the same cache sets).
 *
 * Determinism: OpenMP splits work by output rows, and the sums over tokens in backward go
 * through a fixed number of chunks of tokens that depends on N only, added in a fixed
 * order, so results are bit-identical for any number of threads. No atomics, no fast-math.
 *
 * SIMD: GCC/Clang vector extensions (lora_kernels_simd.h), built for AVX2 + FMA and for the
 * baseline on x86-64 and picked at run time (instantiate.h; LORA_V3 and SIMD() in lora_internal.h).
 */
#include <stdlib.h>
#include <string.h>

#include "lora_np.h"
#include "lora_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define ROWS 32            /* forward and merge: token rows per cache block */
#define CHUNK_ROWS 256     /* backward: at least this many tokens per chunk ... */
#define MAX_CHUNKS 16      /* ... and at most this many chunks */
#define BWD_BYTES (96 * 1024) /* backward: bytes of dy and dx rows per block of g and dx */
#define GROUP_BYTES (16 * 1024) /* backward: bytes of dy and x rows per group, per unit of rank */
#define PANEL_BYTES (32 * 1024) /* backward: the slice of a partial sum kept in cache */
#define SMALL_BYTES (128 * 1024) /* the slice of lora_A or lora_B kept in cache (r * width) */
#define PARALLEL_WORK 200000 /* multiply-adds below which a call stays on one thread */

static int lora_num_threads = 0;

void lora_set_num_threads(int n) { lora_num_threads = n > 0 ? n : 0; }

int lora_get_num_threads(void)
{
#ifdef _OPENMP
    return lora_num_threads > 0 ? lora_num_threads : omp_get_max_threads();
#else
    return 1;
#endif
}

int lora_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* Number of token chunks for the backward sums: a function of N alone. */
static int64_t n_chunks(int64_t N)
{
    int64_t c = (N + CHUNK_ROWS - 1) / CHUNK_ROWS;
    return c < 1 ? 1 : min64(c, MAX_CHUNKS);
}

/* Blocks per unit of dynamic scheduling: each thread takes runs of consecutive blocks, so that
 * it can prefetch its next block while it computes one; about 4 runs per thread. */
static int64_t group_blocks(int64_t n_blocks)
{
    int64_t g = n_blocks / (4 * (int64_t)lora_get_num_threads());
    return g < 1 ? 1 : g;
}

/* Backward: token rows per block of g and dx, about BWD_BYTES of dy and dx: a multiple of 3
 * (the row tiles of rows_dot and rows_update), 3 to 15 rows. */
static int64_t bwd_rows(int64_t in, int64_t out, int64_t real_size)
{
    int64_t rows = BWD_BYTES / ((out + in + 1) * real_size) / 3 * 3;
    return rows < 3 ? 3 : rows > 15 ? 15 : rows;
}

/* Backward: token rows per group (the unit of the sums over tokens), a multiple of the block,
 * at most ROWS. Its dy and x rows take about r * GROUP_BYTES: small groups keep them, and the
 * next group's being prefetched, in L2; large ones load and store the partial sums [r, in]
 * and [r, out] less often. */
static int64_t bwd_group(int64_t block, int64_t in, int64_t out, int64_t r, int64_t real_size)
{
    int64_t rows = GROUP_BYTES * r / ((out + in + 1) * real_size) / block * block;
    return rows < block ? block : rows > ROWS ? ROWS / block * block : rows;
}

static int bad_sizes(int64_t N, int64_t in, int64_t out, int64_t r)
{
    return N < 0 || in < 0 || out < 0 || r < 0;
}

/* 1 when this CPU runs the x86-64-v3 build (checked once). The environment variable
 * LORA_NP_SIMD=baseline forces the baseline build, so that tests can check it on any CPU.
 * step_kernels.c uses it too (lora_internal.h). */
int lora_np_use_v3(void)
{
#ifdef LORA_V3
    static int use = -1;
    if (use < 0) {
        const char *simd = getenv("LORA_NP_SIMD");
        use = !(simd && strcmp(simd, "baseline") == 0) && __builtin_cpu_supports("avx2") &&
              __builtin_cpu_supports("fma");
    }
    return use;
#else
    return 0;
#endif
}

#define SIMD_TEMPLATE "lora_kernels_simd.h" /* name_f32_v3, name_f64_v3, name_f32_base, name_f64_base */
#include "instantiate.h"
#define TEMPLATE "lora_kernels_impl.h" /* the public name_f32, name_f64 */
#include "instantiate.h"
