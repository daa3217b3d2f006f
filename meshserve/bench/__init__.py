"""Benchmark tools: `meshserve bench serve` (online, against an OpenAI-compatible server) and
`meshserve bench throughput` (offline, through `meshserve.LLM`).

datasets.py builds the requests, serve.py/throughput.py send them, metrics.py turns the per-request
records into the report (field names follow `vllm bench serve`), plots.py draws it, and shapes.py
counts the bytes of the real model shapes that meshserve/models/shapes.py lays out as random-weight
folders (config + tokenizer, no download).
"""
