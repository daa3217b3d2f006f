#!/usr/bin/env bash
# Disaggregated serving on one machine, in one command: two context servers and one generation
# server (the embedded SmolLM2-135M-Instruct, or $MODEL), the orchestrator in front of them, then the
# seed's client (client.py) against the orchestrator. Everything stops when the script exits.
#
#   examples/disaggregated/run.sh                  # MODEL, MAX_TOKENS (default 128), LOGS (a folder)
#
# The same by hand (the seed's three steps; nothing to set on one machine: the servers and the
# orchestrator share the key file ~/.cache/meshserve/disagg.key, made by whichever starts first;
# across hosts see docs/disaggregated.md, "The key"):
#   meshserve serve --host localhost --port 8001 --config context-config.yml &
#   meshserve serve --host localhost --port 8002 --config context-config.yml &
#   meshserve serve --host localhost --port 8003 --config gen-config.yml &
#   meshserve disaggregated -c disagg-config.yml
# The ports are disagg-config.yml's (8000 for the orchestrator, 8001-8003 for the servers).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  PYTHON="$REPO/.venv/bin/python"
  [[ -x "$PYTHON" ]] || PYTHON="$(command -v python3)"
fi
MODEL="${MODEL:-}"
MAX_TOKENS="${MAX_TOKENS:-128}"
LOGS="${LOGS:-$(mktemp -d -t meshserve-disagg-XXXXXX)}"
mkdir -p "$LOGS"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
# the shared key (it signs disaggregated_params, authenticates KV transfers): MESHSERVE_SECRET when
# set, else the key file (MESHSERVE_SECRET_FILE, else ~/.cache/meshserve/disagg.key, made when missing)

NAMES=()
PIDS=()
cleanup() {
  trap - EXIT INT TERM
  local pid
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  echo "stopped; logs in $LOGS"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() {  # name, then the meshserve command line
  local name="$1"
  shift
  "$PYTHON" -m meshserve "$@" >"$LOGS/$name.log" 2>&1 &
  NAMES+=("$name")
  PIDS+=($!)
  echo "started $name (pid $!): meshserve $*"
}

wait_healthy() {  # url, seconds
  local url="$1" deadline=$((SECONDS + $2)) i
  until "$PYTHON" -c "import sys, httpx; sys.exit(httpx.get('$url', timeout=2).status_code != 200)" 2>/dev/null; do
    for i in "${!PIDS[@]}"; do
      if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
        echo "error: ${NAMES[$i]} exited; the end of $LOGS/${NAMES[$i]}.log:" >&2
        tail -n 20 "$LOGS/${NAMES[$i]}.log" >&2
        exit 1
      fi
    done
    if ((SECONDS > deadline)); then
      echo "error: $url not healthy after $2 s (logs in $LOGS)" >&2
      exit 1
    fi
    sleep 1
  done
  echo "healthy: $url"
}

cd "$HERE"
start context-8001 serve $MODEL --host localhost --port 8001 --config context-config.yml
start context-8002 serve $MODEL --host localhost --port 8002 --config context-config.yml
start generation-8003 serve $MODEL --host localhost --port 8003 --config gen-config.yml
start orchestrator disaggregated -c disagg-config.yml
for port in 8001 8002 8003 8000; do
  wait_healthy "http://localhost:$port/health" 600
done

"$PYTHON" client.py --max-tokens "$MAX_TOKENS"
