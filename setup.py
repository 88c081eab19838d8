"""Builds lora_np's compiled parts; everything else is in pyproject.toml.

- The C core (csrc/, OpenMP) through cffi in API mode: lora_np/_ffi_build.py. If it cannot be
  compiled (no C compiler, say) the install still succeeds with a one-line warning and
  lora_np runs on NumPy.
- The CUDA library (csrc/cuda/) through nvcc, only when LORA_NP_CUDA=1: lora_np/_cuda_build.py,
  which installs csrc/cuda/lora_cuda.h beside it (lora_np/_cuda.py reads its cdef from there).
  Asked for and failing, it stops the install.
"""
import importlib.util
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

HERE = os.path.dirname(os.path.abspath(__file__))


def _warn(what, error):
    first_line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    print(f"warning: lora_np {what} not built ({first_line}); lora_np will run on NumPy", file=sys.stderr)


def _load_cuda_build():
    # By path: importing the lora_np package would need numpy, absent at build time.
    spec = importlib.util.spec_from_file_location("_cuda_build", os.path.join(HERE, "lora_np", "_cuda_build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class optional_build_ext(build_ext):
    """build_ext that lets the C core fail softly and adds the CUDA library when asked."""

    def run(self):
        try:
            super().run()
        except (CCompilerError, BaseError, OSError) as e:
            _warn("C core", e)
        if os.environ.get("LORA_NP_CUDA") == "1":
            cuda_build = _load_cuda_build()
            package_dir = os.path.join(HERE if self.inplace else self.build_lib, "lora_np")
            cuda_build.build(os.path.join(package_dir, cuda_build.LIBRARY_NAME))

    def build_extension(self, ext):
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError, OSError) as e:
            _warn("C core", e)


setup(
    cffi_modules=["lora_np/_ffi_build.py:make_ffibuilder"],
    cmdclass={"build_ext": optional_build_ext},
)
