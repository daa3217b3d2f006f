"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded inputs.

A decode step of B sequences runs the graph of the smallest bucket >= B. Inputs are copied into
static buffers; padding rows read token 0 at position 0, write their KV into the reserved null
block and have seq_len 0, so they attend to nothing and change nothing. The graph covers the
model forward and the LM head; sampling stays outside (its work depends on the requests'
parameters). Only the one-stage case is captured (pipelines run eagerly).
"""
from __future__ import annotations

import bisect
import logging

import torch

from meshserve.layers.attention import AttentionMetadata

logger = logging.getLogger(__name__)


def default_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, 257, 16)) + list(range(288, 1025, 32))
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


def decode_num_splits(batch_size: int, num_kv_heads: int, num_sms: int) -> int:
    """KV splits so a decode step has about two programs per SM (fixed per bucket, graph-safe)."""
    return max(1, min(16, (2 * num_sms) // max(1, batch_size * num_kv_heads)))


class CudaGraphRunner:
    def __init__(self, runner, batch_sizes: list[int], max_seq_len: int):
        self.runner = runner
        self.sizes = sorted(batch_sizes)
        self.max_bs = self.sizes[-1]
        dev = runner.device
        bs = runner.cfg.block_size
        n = self.max_bs
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slot_mapping = torch.zeros(n, dtype=torch.int64, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.query_start_loc = torch.arange(n + 1, dtype=torch.int32, device=dev)
        self.block_tables = torch.zeros(n, -(-max_seq_len // bs), dtype=torch.int32, device=dev)
        self.tile_seq = torch.arange(n, dtype=torch.int32, device=dev)
        self.tile_start = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.metadata: dict[int, AttentionMetadata] = {}
        self.num_sms = torch.cuda.get_device_properties(dev).multi_processor_count

    def _metadata(self, b: int) -> AttentionMetadata:
        kvh = self.runner.attn_layers[0].num_kv_heads
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.runner.cfg.block_size,
            block_size=self.runner.cfg.block_size, num_decodes=b,
            backend_data={"tile_seq": self.tile_seq[:b], "tile_start": self.tile_start[:b], "block_q": 1,
                          "num_splits": decode_num_splits(b, kvh, self.num_sms), "workspace": {}})

    @torch.no_grad()
    def capture(self) -> None:
        model = self.runner.model
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            md = self._metadata(b)
            self.metadata[b] = md
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: compile kernels, allocate workspaces
                    hidden, _ = model(self.input_ids[:b], self.positions[:b], md)
                    model.compute_logits(hidden)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                hidden, _ = model(self.input_ids[:b], self.positions[:b], md)
                self.logits[b] = model.compute_logits(hidden)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs

    def run(self, inp) -> torch.Tensor:
        """Replay for a decode-only batch; returns logits [B, V]."""
        b = len(inp.req_ids)
        padded = self.sizes[bisect.bisect_left(self.sizes, b)]
        md = inp.attn
        self.input_ids[:b].copy_(inp.input_ids, non_blocking=True)
        self.positions[:b].copy_(inp.positions, non_blocking=True)
        self.slot_mapping[:b].copy_(md.slot_mapping, non_blocking=True)
        self.seq_lens[:b].copy_(md.seq_lens, non_blocking=True)
        w = md.block_tables.shape[1]
        self.block_tables[:b, :w].copy_(md.block_tables, non_blocking=True)
        if padded > b:
            self.input_ids[b:padded].zero_()
            self.positions[b:padded].zero_()
            self.slot_mapping[b:padded].zero_()
            self.seq_lens[b:padded].zero_()
        self.graphs[padded].replay()
        return self.logits[padded][:b]
