/* lora_internal.h: what the C files of the core share and Python does not see. */
#ifndef LORA_INTERNAL_H
#define LORA_INTERNAL_H

#include <stdint.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#if !defined(__GNUC__)
#error "the C core needs GCC or Clang (vector extensions); lora_np falls back to NumPy"
#endif

/* 1 when the AVX2 + FMA build runs on this CPU (lora_kernels.c; LORA_NP_SIMD=baseline says 0). */
int lora_np_use_v3(void);

/* On x86-64 with GCC the SIMD code (*_simd.h) is built twice: for AVX2 + FMA (x86-64-v3, 32-byte
 * vectors) and for the baseline (16-byte SSE2 vectors), and the public functions pick one per call
 * from what the CPU reports, so a wheel built here runs anywhere and still uses AVX2 where it can.
 * Elsewhere (Clang, other CPUs) only the baseline build exists, with 16-byte vectors. */
#if defined(__x86_64__) && !defined(__clang__)
#define LORA_V3 1
#endif

#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* Prefetch the cache line `bytes` past p into all levels. The address may lie past the end of
 * the array (prefetches never fault); it is computed as an integer so that no pointer does. */
ALWAYS_INLINE void prefetch_ahead(const void *p, int64_t bytes)
{
    __builtin_prefetch((const void *)((uintptr_t)p + (uintptr_t)bytes), 0, 3);
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* The calling thread's index in its OpenMP team: which slice of the scratch memory is its own. */
static inline int64_t thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

#define CAT_(a, b) a##_##b
#define CAT(a, b) CAT_(a, b)

/* SIMD(name): the worker name_SFX_v3 or name_SFX_base of a *_simd.h file, for this CPU. */
#ifdef LORA_V3
#define SIMD(name) (lora_np_use_v3() ? CAT(name, CAT(SFX, v3)) : CAT(name, CAT(SFX, base)))
#else
#define SIMD(name) CAT(name, CAT(SFX, base))
#endif

#endif
