"""The compute kernels: each op's NumPy reference, its C call and its one dispatch point.

    backend.py      the backend registry (numpy / c / cuda), the compiled C module, threads and memory
    checks.py       the one argument checker, and its fast path for the LoRA ops on the C backend
    lora.py         the LoRA branch: lora_forward, lora_backward, lora_merge (also on CUDA)
    rows.py         the SwiGLU gate (silu_mul_*) and the row softmaxes (softmax_rows, exp_rows)
    norm_rotary.py  RMSNorm (rms_norm_*) and rotary position embedding (rotary)
    attention.py    scaled dot-product attention (attention_*)
    gemm.py         the C core's float GEMM, and a LoRA Linear with its low-rank branch fused into it

Each op picks its backend itself (lora_np.backend(), or cuda.DeviceArray arguments for the LoRA
ops): the autograd ops of lora_np.functional call it and never branch on the backend. On the
NumPy backend no compiled code runs; a C function missing from an older build raises a
RuntimeError that says to rebuild. To add an op: its file here (NumPy reference, C call through
backend.call_c, one dispatch function), its C in csrc/, its Function in lora_np.functional.
"""
# backend first: it sets the `lora-np` command's OpenBLAS policy before anything loads NumPy
from .backend import (BACKENDS, available_backends, backend, get_num_threads, keep_freed_memory, set_backend,
                      set_num_threads, set_threads)
from .attention import attention_backward, attention_forward
from .checks import contiguous
from .lora import lora_backward, lora_forward, lora_merge
from .norm_rotary import rms_norm_backward, rms_norm_forward, rotary
from .rows import exp_rows, silu_mul_backward, silu_mul_forward, softmax_rows

__all__ = ["BACKENDS", "available_backends", "backend", "set_backend", "set_num_threads", "get_num_threads",
           "set_threads", "keep_freed_memory", "lora_forward", "lora_backward", "lora_merge", "silu_mul_forward",
           "silu_mul_backward", "softmax_rows", "exp_rows", "rms_norm_forward", "rms_norm_backward", "rotary",
           "attention_forward", "attention_backward", "contiguous"]
