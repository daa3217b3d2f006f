"""Benchmark tools: `meshserve bench serve` (online, against an OpenAI-compatible server) and
`meshserve bench throughput` (offline, through `meshserve.LLM`).

datasets.py builds the requests, serve.py/throughput.py send them, metrics.py turns the per-request
records into the report (field names follow `vllm bench serve`), plots.py draws it, and shapes.py
writes random-weight model folders of real shapes (config + tokenizer, no download).
"""
