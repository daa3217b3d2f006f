"""Disaggregated serving: context servers prefill and hand their KV cache to generation servers.

- `transceiver.py`: the KV transfer interface (per-rank `KvSource` on context servers, `KvSink` on
  generation servers, a transfer state enum) and the layout each side describes itself with.
- `tcp.py`: the DEFAULT backend (TCP, msgspec headers + raw tensor bytes, no pickle; its sink in
  `tcp_sink.py`), with `wire.py`
  (its messages, framing and MACs, which the other backends' control path shares) and `cuda_ipc.py`
  (CUDA IPC between processes of one host); `nixl.py`, `ucx.py`, `mpi.py` (+ `_side.py`): the other
  backends.
- `params.py`: the opaque, signed `disaggregated_params` a context server hands back, and the key.
- `orchestrator.py` (+ `orchestrator_config.py`, `orchestrator_metrics.py`, `relay.py`,
  `failover.py`) and `router.py`: `meshserve disaggregated -c FILE`.
See docs/disaggregated.md for the protocol.
"""
