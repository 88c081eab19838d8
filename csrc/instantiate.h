/* instantiate.h: compiles a type-generic file once per element type, in one line of the .c file.
 *
 *     #define TEMPLATE "step_kernels_impl.h"
 *     #include "instantiate.h"
 *
 * includes the file twice, with `real` = float, SFX = f32, IS_F32 = 1 and with `real` = double,
 * SFX = f64, IS_F32 = 0, and FN(name) = name_SFX: each function it defines exists as name_f32 and
 * name_f64. A SIMD file (*_simd.h) is named SIMD_TEMPLATE instead and is also compiled once per
 * instruction set: ISA = v3 (AVX2 + FMA under #pragma GCC target, VBYTES = 32 bytes a vector; only
 * where lora_internal.h defines LORA_V3) and ISA = base (the compiler's baseline, VBYTES = 16), with
 * FN(name) = name_SFX_ISA: name_f32_v3, name_f64_v3, name_f32_base, name_f64_base. SIMD(name) in
 * lora_internal.h picks the set this CPU has. The macro is undefined afterwards; no include guard.
 */
#ifdef SIMD_TEMPLATE
#define INSTANCE SIMD_TEMPLATE
#define CAT3_(a, b, c) a##_##b##_##c
#define CAT3(a, b, c) CAT3_(a, b, c)
#define FN(name) CAT3(name, SFX, ISA)
#ifdef LORA_V3
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define ISA v3
#define VBYTES 32
#include "instantiate_types.h"
#undef ISA
#undef VBYTES
#pragma GCC pop_options
#endif
#define ISA base
#define VBYTES 16
#include "instantiate_types.h"
#undef ISA
#undef VBYTES
#undef CAT3
#undef CAT3_
#undef SIMD_TEMPLATE
#else
#define INSTANCE TEMPLATE
#define FN(name) CAT(name, SFX)
#include "instantiate_types.h"
#undef TEMPLATE
#endif
#undef FN
#undef INSTANCE
