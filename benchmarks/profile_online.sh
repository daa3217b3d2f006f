#!/usr/bin/env bash
# Where online TTFT goes: one `meshserve serve` (random weights), kernels warmed by a separate
# warm-up run, then one Poisson-rate run with (1) the server's own histograms scraped before and
# after it (TTFT from engine arrival, queue time, engine step; warm-ups excluded), set against the
# client's TTFT, and (2) py-spy profiles of the API-server and engine processes taken while
# requests are running (py-spy from .whl/ on the GPU machine; `pip install py-spy` elsewhere).
#   MODEL: shape name or model folder (default llama-3.1-8b); RATE (16); NP: requests (200);
#   INPUT_LEN (467); OUTPUT_LEN (256); PYSPY_SECONDS (8); SERVER_ARGS: extra `meshserve serve` flags.
# Writes $OUT/profile_online.json, $OUT/pyspy_{api,engine}.txt (raw stacks) and prints a summary.
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"
B=/tmp/profile_online; rm -rf $B; mkdir -p $B
PORT=${PORT:-8126}; URL=http://127.0.0.1:$PORT
MODEL_PATH=$(python3 -c "from meshserve.bench.shapes import resolve_model; print(resolve_model('${MODEL:-llama-3.1-8b}'))")
PYSPY=$(command -v py-spy || echo /tmp/site/bin/py-spy)
python3 -m meshserve serve "$MODEL_PATH" --load-format dummy --host 127.0.0.1 --port $PORT ${SERVER_ARGS:-} \
  > $B/server.log 2>&1 &
S=$!
trap 'kill -TERM $S 2>/dev/null; wait $S 2>/dev/null' EXIT
for _ in $(seq 1 600); do curl -sf $URL/health >/dev/null && break; sleep 1; done
ENG=$(pgrep -P $S -f spawn_main | head -1)
bench() { python3 -m meshserve bench serve --base-url $URL --tokenizer "$MODEL_PATH" --dataset random \
  --input-len "${INPUT_LEN:-467}" --output-len "${OUTPUT_LEN:-256}" "$@"; }
# Warm-up with prompts of its own (another seed), so nothing of the measured run is cached.
bench --num-prompts 8 --request-rate inf --seed 12345 > $B/warmup.log 2>&1
python3 benchmarks/server_stats.py scrape $URL $B/before.json
bench --num-prompts "${NP:-200}" --request-rate "${RATE:-16}" --result-json $B/result.json > $B/bench.log 2>&1 &
BP=$!
for _ in $(seq 1 600); do  # profile only once requests run
  curl -s $URL/metrics | grep -qE '^meshserve_num_requests_running\{[^}]*\} [1-9]' && break; sleep 0.2
done
$PYSPY record -p "$ENG" -d "${PYSPY_SECONDS:-8}" -r 250 --nonblocking -f raw -o "$OUT/pyspy_engine.txt" \
  > $B/pyspy_engine.log 2>&1 &
P1=$!
$PYSPY record -p $S -d "${PYSPY_SECONDS:-8}" -r 250 --nonblocking -f raw -o "$OUT/pyspy_api.txt" > $B/pyspy_api.log 2>&1
wait $P1
tail -n 2 $B/pyspy_engine.log $B/pyspy_api.log
wait $BP
tail -n 12 $B/bench.log
python3 benchmarks/server_stats.py scrape $URL $B/after.json
python3 benchmarks/server_stats.py report $B/before.json $B/after.json $B/result.json "$OUT/profile_online.json" \
  "$OUT/pyspy_api.txt" "$OUT/pyspy_engine.txt"
