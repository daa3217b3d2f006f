# Source on the GPU machine: installs the wheels carried in .whl/ (packages its image lacks) into
# /tmp/site and puts them and the repo on PYTHONPATH. See docs/gpu.md.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v -i warning || true
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
export MESHSERVE_CACHE=/tmp/meshserve-cache
