/* simd_vec.h: the vector type of one instantiation of a *_simd.h file (element type `real`, suffix
 * SFX, instruction set ISA with VBYTES-byte vectors; see instantiate.h), shared by
 * lora_kernels_simd.h and step_kernels_simd.h, which include it first; simd_vec_end.h undoes its
 * macros at their end. vec holds VL reals and may sit at any real-aligned address. */
#define VL ((int64_t)(VBYTES / sizeof(real)))

typedef real FN(vec) __attribute__((vector_size(VBYTES), aligned(sizeof(real)), may_alias));
#define vec FN(vec)

ALWAYS_INLINE vec FN(load)(const real *p) { return *(const vec *)p; }
ALWAYS_INLINE void FN(store)(real *p, vec v) { *(vec *)p = v; }
ALWAYS_INLINE vec FN(splat)(real s) { return (vec){0} + s; }

ALWAYS_INLINE real FN(hsum)(vec v)
{
    real s = 0;
    for (int l = 0; l < VL; l++) s += v[l];
    return s;
}
