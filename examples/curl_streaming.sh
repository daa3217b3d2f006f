#!/usr/bin/env bash
# Stream a chat completion from `meshserve serve` with curl (Server-Sent Events).
#
#   meshserve serve --port 8000 &
#   examples/curl_streaming.sh                          # HOST, PORT, MODEL, PROMPT, MAX_TOKENS, API_KEY
#
# Each event is a line `data: {chat.completion.chunk}`; the stream ends with `data: [DONE]`.
set -euo pipefail

HOST="${HOST:-localhost}"
PORT="${PORT:-8000}"
MODEL="${MODEL:-SmolLM2-135M-Instruct}"
PROMPT="${PROMPT:-What is the capital of France?}"
MAX_TOKENS="${MAX_TOKENS:-64}"
API_KEY="${API_KEY:-EMPTY}"

curl -sS -N "http://${HOST}:${PORT}/v1/chat/completions" \
  -H "Content-Type: application/json" \
  -H "Authorization: Bearer ${API_KEY}" \
  -d @- <<JSON
{
  "model": "${MODEL}",
  "messages": [{"role": "user", "content": "${PROMPT}"}],
  "max_tokens": ${MAX_TOKENS},
  "temperature": 0,
  "stream": true,
  "stream_options": {"include_usage": true}
}
JSON
