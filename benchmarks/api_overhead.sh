#!/usr/bin/env bash
# CPU the API-server process spends per streamed token (HTTP parsing, JSON, detokenization, SSE,
# the engine's messages), on any machine: `meshserve serve` with a one-layer model of width 32
# that keeps the llama-3.1-8b tokenizer (so the engine is cheap and the text path is the real
# one), 64 requests x 256 tokens at concurrency 16; CPU time from /proc. Then 30 requests at 4/s
# for TTFT / ITL at low load. Linux only. To compare HTTP parsers, run it with and without
# httptools installed (uvicorn falls back to h11).
set -u
PY=${PYTHON:-python3}
M=$($PY benchmarks/api_tiny_model.py) || exit 1
PORT=${PORT:-8210}; URL=http://127.0.0.1:$PORT
$PY -m meshserve serve $M --load-format dummy --host 127.0.0.1 --port $PORT > /tmp/api_overhead_server.log 2>&1 &
S=$!
trap 'kill -TERM $S 2>/dev/null; wait $S 2>/dev/null' EXIT
for _ in $(seq 120); do curl -sf $URL/health >/dev/null && break; sleep 1; done
cpu() { awk '{print $14 + $15}' /proc/$1/stat; }  # utime + stime, clock ticks
bench() { $PY -m meshserve bench serve --base-url $URL --tokenizer $M --dataset random --input-len 128 \
  --output-len 256 "$@"; }
bench --num-prompts 8 --request-rate inf --seed 7 > /dev/null 2>&1
a0=$(cpu $S)
bench --num-prompts 64 --request-rate inf --max-concurrency 16 --seed 1 > /dev/null 2>&1
a1=$(cpu $S)
$PY -c "import os; t = os.sysconf('SC_CLK_TCK'); print(f'API-server CPU per streamed token: {($a1 - $a0) / t / (64 * 256) * 1e6:.0f} us')"
bench --num-prompts 30 --request-rate 4 --seed 2 2>&1 | grep -E "Mean TTFT|Mean ITL"
