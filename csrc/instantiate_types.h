/* instantiate_types.h: part of instantiate.h, which see: INSTANCE as float, then as double. */
#define real float
#define SFX f32
#define IS_F32 1
#include INSTANCE
#undef real
#undef SFX
#undef IS_F32

#define real double
#define SFX f64
#define IS_F32 0
#include INSTANCE
#undef real
#undef SFX
#undef IS_F32
