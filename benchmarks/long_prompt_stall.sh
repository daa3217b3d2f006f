#!/usr/bin/env bash
# benchmarks/long_prompt_stall.py against `meshserve serve` with the width-32 model of
# api_overhead.sh (cheap engine, the llama-3.1-8b tokenizer), twice: long prompts tokenized on the
# API server's event loop (--tokenize_offload_chars huge), then off it (the default). The
# server's --max_seq_len 4096 refuses the long prompts after tokenizing them: no engine work.
#   CHARS (120000), STREAMS (8), ROUNDS (2: both settings, interleaved). Results: $OUT/long_prompt_*.json
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-out}; mkdir -p "$OUT"
M=$($PY benchmarks/api_tiny_model.py) || exit 1
PORT=${PORT:-8211}; URL=http://127.0.0.1:$PORT
run() {  # label, offload threshold, round
  $PY -m meshserve serve $M --tokenize_offload_chars $2 --load-format dummy --max_seq_len 4096 \
    --host 127.0.0.1 --port $PORT > /tmp/long_prompt_server.log 2>&1 &
  local S=$!
  for _ in $(seq 120); do curl -sf $URL/health >/dev/null && break; sleep 1; done
  $PY benchmarks/long_prompt_stall.py --base-url $URL --chars "${CHARS:-120000}" --streams "${STREAMS:-8}" \
    --label "$1" --out "$OUT/long_prompt_$1_$3.json"
  kill -TERM $S; wait $S 2>/dev/null
}
for r in $(seq "${ROUNDS:-2}"); do
  run on_loop 1000000000 $r
  run off_loop 4096 $r
done
