#!/usr/bin/env bash
# online-8b A/B across code versions on one machine: for each source tree given (`.` for this
# one), start `meshserve serve llama-3.1-8b --load-format dummy` from that tree, run this tree's
# online_8b.py client against it, stop it. Same client, same machine, servers one after another.
# Make older trees with e.g. `git archive 5a3f7a8 | tar -x -C abtmp/5a3f7a8` (abtmp/ in
# .git/info/exclude, then `carry: ["abtmp"]` to the GPU machine).
# An argument TREE:CONFIG (e.g. `.:benchmarks/configs/no_overlap.yml`) starts that tree's server with
# `--config CONFIG` (a path relative to this tree), for A/Bs of settings.
#   NP: requests per rate (default 150); RATES: default 16,32; SERVER_ARGS: extra serve flags.
# Results: $OUT/online_<tree>.json and the printed tables.
set -u
ROOT=$PWD
OUT=${OUT:-out}
B=/tmp/ab_online; mkdir -p $B "$OUT"
PORT=8124
for arg in "$@"; do
  tree=${arg%%:*}; cfg=""; [ "$tree" != "$arg" ] && cfg=$ROOT/${arg#*:}
  dir=$(cd "$tree" && pwd); tag=$(basename "$dir"); [ "$dir" = "$ROOT" ] && tag=this
  [ -n "$cfg" ] && tag=${tag}_$(basename "$cfg" .yml)
  (cd "$dir" && PYTHONPATH=/tmp/site:$dir exec python3 -m meshserve serve llama-3.1-8b --load-format dummy \
    --host 127.0.0.1 --port $PORT ${cfg:+--config "$cfg"} ${SERVER_ARGS:-}) > "$B/server_$tag.log" 2>&1 &
  S=$!
  for _ in $(seq 1 240); do curl -sf http://127.0.0.1:$PORT/health >/dev/null && break; sleep 1; done
  echo "=== $arg"
  python3 benchmarks/online_8b.py --base-url http://127.0.0.1:$PORT --model llama-3.1-8b --num-prompts "${NP:-150}" \
    --rates "${RATES:-16,32}" --out "$B/online_$tag" 2>&1 | grep -A8 "^online-8b"
  kill -TERM $S; wait $S
  cp "$B/online_$tag/online_8b.json" "$OUT/online_$tag.json" 2>/dev/null
done
