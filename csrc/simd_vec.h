/* simd_vec.h: the vector type of one instantiation of a *_simd.h file (element type `real`, suffix
 * SFX, instruction set ISA with VBYTES-byte vectors), shared by lora_kernels_simd.h and
 * step_kernels_simd.h, which include it first; simd_vec_end.h undoes its macros at their end.
 * FN(name) is name_SFX_ISA; vec holds VL reals and may sit at any real-aligned address. */
#define CAT3_(a, b, c) a##_##b##_##c
#define CAT3(a, b, c) CAT3_(a, b, c)
#define FN(name) CAT3(name, SFX, ISA)
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
