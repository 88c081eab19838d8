"""cffi build script (API mode) for the C core in csrc/: `cffi_modules` in setup.py points at make_ffibuilder.

Compiles csrc/lora_kernels.c, csrc/step_kernels.c, csrc/quant_kernels.c and csrc/gemm_kernels.c into the
extension module `lora_np._lora_np_c` with -O3 and, when the compiler accepts it, OpenMP. No -ffast-math: the
kernels are compared with the NumPy reference element by element. Run this file directly to build the module in place.
Importing it does no work: lora_np/_cuda.py takes cdef_from_header from here for the CUDA header.
"""
import os
import subprocess
import sysconfig
import tempfile

from cffi import FFI

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADERS = [os.path.join("csrc", f) for f in ("lora_np.h", "quant.h", "gemm.h")]
SOURCES = [os.path.join("csrc", f) for f in ("lora_kernels.c", "step_kernels.c", "quant_kernels.c", "gemm_kernels.c")]
DEPENDS = HEADERS + [os.path.join("csrc", f) for f in (
    "lora_internal.h", "instantiate.h", "instantiate_types.h", "lora_kernels_impl.h", "lora_kernels_simd.h", "step_kernels_impl.h", "step_kernels_simd.h",
    "simd_vec.h", "simd_vec_end.h", "quant_kernels_impl.h", "quant_kernels_simd.h", "gemm_kernels_impl.h",
    "gemm_kernels_simd.h")]


def cdef_from_header(path):
    """The header's declarations without its preprocessor lines (cffi parses no macros)."""
    with open(path) as f:
        return "\n".join(line for line in f.read().splitlines() if not line.lstrip().startswith("#"))


def openmp_flags():
    """['-fopenmp'] when the C compiler builds and links an OpenMP program, else []."""
    cc = (os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc").split()
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "omp.c")
        with open(src, "w") as f:
            f.write("#include <omp.h>\nint main(void) { return omp_get_max_threads() < 1; }\n")
        try:
            done = subprocess.run(cc + ["-fopenmp", src, "-o", os.path.join(tmp, "omp")], capture_output=True)
        except OSError:
            return []
    return ["-fopenmp"] if done.returncode == 0 else []


def make_ffibuilder():
    """The FFI of lora_np._lora_np_c, its cdef read from csrc/lora_np.h, csrc/quant.h and csrc/gemm.h."""
    omp = openmp_flags()
    builder = FFI()
    builder.cdef("\n".join(cdef_from_header(os.path.join(ROOT, h)) for h in HEADERS))
    builder.set_source(
        "lora_np._lora_np_c",
        '#include "lora_np.h"\n#include "quant.h"\n#include "gemm.h"',
        sources=SOURCES,
        depends=DEPENDS,
        include_dirs=["csrc"],
        extra_compile_args=["-O3", "-Wno-psabi"] + omp,
        extra_link_args=omp,
    )
    return builder


if __name__ == "__main__":
    os.chdir(ROOT)
    make_ffibuilder().compile(tmpdir=ROOT, verbose=False)
