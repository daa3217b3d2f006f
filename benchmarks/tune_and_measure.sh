#!/usr/bin/env bash
# One short GPU call (see docs/gpu.md): kernel tests, the attention sweep, then the server scenarios
# with the sweep's fastest prefill tile shape and decode split_tiles given to the engine as its
# kernel_config (a `meshserve serve --config` YAML, $OUT/kernel_config.yml).
#   ONLINE_RATES (default 16,32,inf) and NUM_ONLINE (default 100) pass through to run_gpu_suite.sh.
set -u
OUT=${OUT:-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest tests/gpu/test_paged_attention_kernel.py tests/gpu/test_gemv_kernel.py -q -x 2>&1 | tail -4
timeout 200 python3 benchmarks/attention_kernel.py --quick --json "$OUT/attention_sweep.json" >"$OUT/attention_sweep.txt" 2>&1
grep -E "^decode b1|^fastest|failed" "$OUT/attention_sweep.txt" | cut -c1-400
CONFIG_ARGS=""
if [ -f "$OUT/attention_sweep.json" ]; then
  python3 - "$OUT/attention_sweep.json" "$OUT/kernel_config.yml" <<'PY'
import json, sys
import yaml
suggested = json.load(open(sys.argv[1]))["suggested_kernel_config"]
yaml.safe_dump({"kernel_config": suggested}, open(sys.argv[2], "w"), sort_keys=False)
PY
  cat "$OUT/kernel_config.yml"
  CONFIG_ARGS="--config $OUT/kernel_config.yml"
fi
PARTS=online ONLINE_RATES=${ONLINE_RATES:-16,32,inf} OUT="$OUT" SERVER_ARGS="${SERVER_ARGS:-} $CONFIG_ARGS" \
  timeout 300 bash benchmarks/run_gpu_suite.sh 2>&1 | tail -30
