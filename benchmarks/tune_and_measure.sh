#!/usr/bin/env bash
# One short GPU call (see docs/gpu.md): kernel tests, the attention sweep, then the server scenarios
# with the sweep's fastest prefill tile shape and decode split_tiles exported to the engine.
#   ONLINE_RATES (default 16,32,inf) and NUM_ONLINE (default 100) pass through to run_gpu_suite.sh.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest tests/gpu/test_paged_attention_kernel.py tests/gpu/test_gemv_kernel.py -q -x 2>&1 | tail -4
timeout 200 python3 benchmarks/attention_kernel.py --quick --json "$OUT/attention_sweep.json" >"$OUT/attention_sweep.txt" 2>&1
grep -E "^decode b1|^fastest|failed" "$OUT/attention_sweep.txt" | cut -c1-400
if [ -f "$OUT/attention_sweep.json" ]; then
  eval "$(python3 - "$OUT/attention_sweep.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); p = d["prefill"]
print(f"export MESHSERVE_ATTN_PREFILL_ROWS={p['rows']} MESHSERVE_ATTN_PREFILL_BLOCK_N={p['block_n']} "
      f"MESHSERVE_ATTN_PREFILL_WARPS={p['warps']} MESHSERVE_ATTN_PREFILL_STAGES={p['stages']} "
      f"MESHSERVE_ATTN_SPLIT_TILES={d['decode_split_tiles']}")
PY
)"
fi
env | grep MESHSERVE_ATTN || true
PARTS=online ONLINE_RATES=${ONLINE_RATES:-16,32,inf} OUT="$OUT" timeout 300 bash benchmarks/run_gpu_suite.sh 2>&1 | tail -30
