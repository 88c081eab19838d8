/* gemm_kernels.c: dense float32 / float64 GEMMs in C11 + OpenMP, and a LoRA layer's forward and input
 * gradient with the low-rank branch fused into the GEMM (gemm.h).
 *
 * BLIS's structure: K in panels of at most KC, the panel of the weight packed into slivers of NR
 * columns (kept in L1 while a block of rows passes over it), each block of rows of the activations
 * packed into slivers of MR rows (kept in L2), and a micro-kernel that holds an MR x NR tile of the
 * output in registers (gemm_kernels_simd.h). Work is split by blocks of output rows: no atomics, and
 * each output element is summed in an order fixed by K alone, so results are bit-identical for any
 * number of threads.
 *
 * The fused LoRA layer appends the r rows of lora_A (forward; lora_B^T's in backward) to the packed
 * weight as r more output columns: t = x lora_A^T comes out of the same micro-kernel over the same
 * packed x. On the last panel of K each output tile, still in registers, gets its low-rank term
 * t @ (scaling lora_B^T) as r more multiply-adds of the same micro-kernel before it is stored.
 *
 * SIMD: GCC/Clang vector extensions, built for AVX2 + FMA and for the baseline and picked at run
 * time, as in lora_kernels.c (instantiate.h; SIMD() in lora_internal.h).
 */
#include <stdlib.h>
#include <string.h>

#include "gemm.h"
#include "lora_internal.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#define MR 6               /* rows of the micro-kernel's tile (columns: NR = 2 vectors) */
#define KC 288             /* at most this many k per panel: a sliver of the weight, KC x NR, stays in L1 */
#define MC 384             /* at most this many rows per block: a block of the activations stays in L2 */
#define PACK_BYTES (8 << 20) /* at most this much of the weight packed at a time (all of a small one) ... */
#define CHUNK_COLS 1024    /* ... unless that is fewer columns than this (A is packed again per chunk) */
#define VPAD 16            /* reals of slack after each buffer */
#define PARALLEL_WORK 200000 /* multiply-adds below which a call stays on one thread */

#define SIMD_TEMPLATE "gemm_kernels_simd.h" /* name_f32_v3, name_f64_v3, name_f32_base, name_f64_base */
#include "instantiate.h"
#define TEMPLATE "gemm_kernels_impl.h" /* the public name_f32, name_f64 */
#include "instantiate.h"
