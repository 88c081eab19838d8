/* lora_internal.h: what the C files of the core share and Python does not see. */
#ifndef LORA_INTERNAL_H
#define LORA_INTERNAL_H

/* 1 when the AVX2 + FMA build runs on this CPU (lora_kernels.c; LORA_NP_SIMD=baseline says 0). */
int lora_np_use_v3(void);

#endif
