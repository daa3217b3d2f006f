"""Disaggregated serving: context servers prefill and hand their KV cache to generation servers.

- `transceiver.py`: the KV transfer interface (per-rank `KvSource` on context servers, `KvSink` on
  generation servers, a transfer state enum) and the layout each side describes itself with.
- `tcp.py`: the DEFAULT backend (TCP, msgspec headers + raw tensor bytes, no pickle).
- `params.py`: the opaque, signed `disaggregated_params` a context server hands back.
- `orchestrator.py` + `router.py`: `meshserve disaggregated -c FILE`.
See docs/disaggregated.md for the protocol.
"""
