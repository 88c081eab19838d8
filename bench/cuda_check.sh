#!/usr/bin/env bash
# On a GPU machine: build lora_np's CUDA library (and its C core), run the CUDA tests and the
# GPU benchmark, in one go.
#   bash bench/cuda_check.sh
# Where cffi is missing (the lent GPU machine runs Python 3.12 without it), wheels of cffi and
# pycparser for that Python are taken from .whl/ (see REFERENCE.md 5b for how to fetch them).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
if ! python3 -c "import cffi" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
nvcc --version | tail -1
python3 --version
echo "== build: CUDA library (sm_80, sm_90) and C core"
time python3 lora_np/_cuda_build.py
echo "== tests/kernels/test_kernels_cuda.py"
python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels_cuda.py || echo "== CUDA TESTS FAILED"
echo "== benchmark vs PyTorch eager CUDA"
python3 bench/lora_kernels.py --cuda
echo "== C core on this machine: build and tests/kernels/test_kernels.py"
python3 lora_np/_ffi_build.py && timeout 150 python3 -m pytest -q -p no:cacheprovider tests/kernels/test_kernels.py
