/* simd_vec_end.h: undoes simd_vec.h's macros at the end of a *_simd.h instantiation. */
#undef vec
#undef VL
