"""Build the optional CUDA library csrc/cuda/lora_cuda.cu with nvcc (sm_80 and sm_90).

Used by setup.py when LORA_NP_CUDA=1, or run directly to build lora_np/_lora_np_cuda.so in
place. The library links the CUDA runtime statically and is loaded by lora_np/_cuda.py through
cffi's ABI mode, so it needs only the NVIDIA driver at run time. Its header csrc/cuda/lora_cuda.h
is copied beside it (_lora_np_cuda.h): _cuda.py reads the cffi declarations from that copy, so
the library and the declarations it is called through always come from the same build. This file imports nothing
from lora_np (setup.py loads it before lora_np's dependencies are installed).
"""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCE = os.path.join(ROOT, "csrc", "cuda", "lora_cuda.cu")
HEADER = os.path.join(ROOT, "csrc", "cuda", "lora_cuda.h")
LIBRARY_NAME = "_lora_np_cuda.so"
HEADER_NAME = "_lora_np_cuda.h"
ARCHS = ("80", "90")


def nvcc_command(output):
    nvcc = os.environ.get("NVCC") or shutil.which("nvcc") or "nvcc"
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    return [nvcc, "-O3", "-shared", "-Xcompiler", "-fPIC", *gencode, "-o", output, SOURCE]


def build(output=os.path.join(ROOT, "lora_np", LIBRARY_NAME)):
    """Compile the library to `output` and copy its header beside it (HEADER_NAME); raises
    CalledProcessError or OSError on failure."""
    os.makedirs(os.path.dirname(output), exist_ok=True)
    subprocess.run(nvcc_command(output), check=True)
    shutil.copyfile(HEADER, os.path.join(os.path.dirname(output), HEADER_NAME))
    return output


if __name__ == "__main__":
    print(build(*sys.argv[1:]))
