"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded inputs;
and for mixed steps (prompt chunks): one graph per token-count bucket (PrefillGraphRunner below).

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


def capture_graph(fn, pool, stream: torch.cuda.Stream):
    """Run fn() twice on `stream` (compiles kernels, allocates workspaces), then capture it into a
    graph drawing on `pool`; returns (graph, what fn returned during the capture)."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=stream):
        out = fn()
    return graph, out


class CudaGraphRunner:
    def __init__(self, runner, batch_sizes: list[int], max_seq_len: int, padding: bool = True):
        self.runner = runner
        self.sizes = sorted(batch_sizes)
        self.padding = padding
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
    def capture(self, pool=None) -> None:
        model = self.runner.model
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            md = self.metadata[b] = self._metadata(b)

            def step():
                hidden, _ = model(self.input_ids[:b], self.positions[:b], md)
                return model.compute_logits(hidden)
            self.graphs[b], self.logits[b] = capture_graph(step, pool, stream)
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.sizes)

    def can_run(self, num_seqs: int) -> bool:
        return num_seqs <= self.max_bs if self.padding else num_seqs in self.graphs

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


def default_prefill_token_sizes(max_tokens: int) -> list[int]:
    """Token-count buckets for mixed (prefill) steps, up to max_tokens."""
    sizes = [16, 32, 64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 3072, 4096]
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens}) if max_tokens > 0 else []


PREFILL_SEQ_CAPS = (8, 32, 128)  # sequence-count sub-buckets below a token bucket's full capacity


class MixedStepBuffers:
    """Static inputs of a mixed step (prompt chunks, possibly with decode rows) padded to a fixed
    token count and sequence count, so one CUDA graph serves every step that fits.

    A graph of T tokens and S sequence slots (S <= T: each sequence has at least one token) has
    S + ceil(T / block_q) query tiles in the Triton kernel's plan, which bounds any step's plan;
    block_q is what block_q_for gives a step of T tokens (smaller tiles for small steps).
    Padding: tokens past the step's own read token 0 at position 0 and write their KV into the null
    block (slot 0); sequence slots past the step's have no queries and no context (query_start_loc
    stays at the step's token count, seq_len 0) and gather hidden row 0; tiles past the plan's
    point at slot S, always such a padding slot, so they exit at once. Real rows therefore see
    exactly the inputs of an unpadded step; padding rows compute garbage that no real row reads.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, group: int, device):
        self.max_tokens, self.group = max_tokens, group
        self.max_seqs = s = min(max_tokens, max_seqs)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(s + 2, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s + 1, max_blocks, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(s, dtype=torch.int64, device=device)
        from meshserve.kernels import paged_attention as pa
        self._block_q_for = pa.block_q_for  # bound once: block_q() runs for every mixed step
        # the most tiles any graph has: the largest graph of each tile size
        n = max(self.tiles_for(t, min(t, s)) for t in {max_tokens, min(max_tokens, pa.PREFILL_LARGE_TOKENS)})
        self.tile_seq = torch.zeros(n, dtype=torch.int32, device=device)
        self.tile_start = torch.zeros(n, dtype=torch.int32, device=device)

    def seq_caps(self, tokens: int) -> list[int]:
        """The sequence-slot counts graphs of `tokens` tokens are captured with: a few small ones
        (fewer empty attention programs for steps with few sequences) and the full one."""
        full = min(tokens, self.max_seqs)
        return sorted({c for c in PREFILL_SEQ_CAPS if c < full} | {full})

    def block_q(self, tokens: int) -> int:
        """Query tokens per tile in a graph of `tokens` tokens (as block_q_for plans such a step)."""
        return self._block_q_for(2, self.group, tokens)

    def tiles_for(self, tokens: int, seqs: int) -> int:
        return seqs + -(-tokens // self.block_q(tokens))

    def metadata(self, tokens: int, seqs: int, block_size: int) -> AttentionMetadata:
        """Views of the buffers for a graph of `tokens` tokens and `seqs` slots (what it is captured with)."""
        n = self.tiles_for(tokens, seqs)
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:tokens], query_start_loc=self.query_start_loc[:seqs + 2],
            seq_lens=self.seq_lens[:seqs + 1], block_tables=self.block_tables[:seqs + 1], max_query_len=tokens,
            max_seq_len=self.block_tables.shape[1] * block_size, block_size=block_size,
            backend_data={"tile_seq": self.tile_seq[:n], "tile_start": self.tile_start[:n],
                          "block_q": self.block_q(tokens),
                          "num_splits": 1, "workspace": {}})

    def fits(self, num_tokens: int, num_seqs: int, num_tiles: int, width: int) -> bool:
        return (num_tokens <= self.max_tokens and num_seqs <= min(num_tokens, self.max_seqs)
                and num_tiles <= self.tiles_for(num_tokens, num_seqs) and width <= self.block_tables.shape[1])

    def fill(self, inp, tokens: int, seqs: int) -> None:
        """Copy a step's inputs (StepInputs with a prefill tile plan) into the buffers, padded to a
        graph of `tokens` tokens and `seqs` sequence slots."""
        md, bd = inp.attn, inp.attn.backend_data
        t, b = inp.num_tokens, len(inp.req_ids)
        s, n = seqs, self.tiles_for(tokens, seqs)
        k = bd["tile_seq"].shape[0]
        self.input_ids[:t].copy_(inp.input_ids, non_blocking=True)
        self.positions[:t].copy_(inp.positions, non_blocking=True)
        self.slot_mapping[:t].copy_(md.slot_mapping, non_blocking=True)
        self.query_start_loc[:b + 1].copy_(md.query_start_loc, non_blocking=True)
        self.seq_lens[:b].copy_(md.seq_lens, non_blocking=True)
        self.block_tables[:b, :md.block_tables.shape[1]].copy_(md.block_tables, non_blocking=True)
        self.logits_indices[:b].copy_(inp.logits_indices, non_blocking=True)
        self.tile_seq[:k].copy_(bd["tile_seq"], non_blocking=True)
        self.tile_start[:k].copy_(bd["tile_start"], non_blocking=True)
        if tokens > t:
            self.input_ids[t:tokens].zero_()
            self.positions[t:tokens].zero_()
            self.slot_mapping[t:tokens].zero_()
        self.query_start_loc[b + 1:s + 2].fill_(t)
        self.seq_lens[b:s + 1].zero_()
        self.logits_indices[b:s].zero_()  # the graph gathers all s rows: stale indices may be past `tokens`
        if n > k:
            self.tile_seq[k:n].fill_(s)
            self.tile_start[k:n].zero_()


class PrefillGraphRunner:
    """CUDA graphs for mixed steps (any step with a prompt chunk), one per (token-count bucket,
    sequence-slot bucket).

    An eager forward of a few hundred tokens costs the host more than the GPU (hundreds of kernel
    launches against ~11 ms of kernels for 467 tokens on the 8B shape), so a short prompt's first
    token waited for Python. The graph covers the model forward and the gather of each sequence's
    last hidden state; the LM head and sampling run after it on just the real rows.
    """

    def __init__(self, runner, token_sizes: list[int], max_seqs: int, max_seq_len: int):
        from meshserve.kernels import paged_attention as pa

        self.runner = runner
        # Steps are planned with smaller attention tiles up to PREFILL_LARGE_TOKENS tokens than past
        # it, and a graph replays the tiles it was captured with: the threshold is always a bucket,
        # so no bucket holds steps of both tile sizes.
        large = pa.PREFILL_LARGE_TOKENS
        self.sizes = sorted(set(token_sizes) | ({large} if max(token_sizes) > large else set()))
        attn0 = runner.attn_layers[0]
        bs = runner.cfg.block_size
        self.buf = MixedStepBuffers(self.sizes[-1], max_seqs, -(-max_seq_len // bs),
                                    attn0.num_heads // attn0.num_kv_heads, runner.device)
        self.last_hidden = torch.zeros(self.buf.max_seqs, runner.model_config.hidden_size, dtype=runner.cfg.dtype,
                                       device=runner.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.replays = 0

    def _forward(self, tokens: int, seqs: int, md: AttentionMetadata) -> None:
        hidden, _ = self.runner.model(self.buf.input_ids[:tokens], self.buf.positions[:tokens], md)
        torch.index_select(hidden, 0, self.buf.logits_indices[:seqs], out=self.last_hidden[:seqs])

    @torch.no_grad()
    def capture(self, pool) -> None:
        stream = torch.cuda.Stream(self.runner.device)
        for t in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            for s in reversed(self.buf.seq_caps(t)):
                md = self.buf.metadata(t, s, self.runner.cfg.block_size)
                # every slot is padding here: the warm-ups touch only the null block
                self.graphs[t, s], _ = capture_graph(lambda: self._forward(t, s, md), pool, stream)
        torch.cuda.synchronize(self.runner.device)
        logger.info("captured %d CUDA graphs for mixed steps of up to %s tokens", len(self.graphs), self.sizes)

    def bucket(self, inp) -> tuple[int, int] | None:
        """The (tokens, sequence slots) graph a step fits in, or None (run it eagerly)."""
        t, b = inp.num_tokens, len(inp.req_ids)
        if t > self.sizes[-1]:
            return None
        tokens = self.sizes[bisect.bisect_left(self.sizes, t)]
        bd = inp.attn.backend_data
        if bd.get("block_q") != self.buf.block_q(tokens):  # planned with other tiles than the graph's
            return None
        if not self.buf.fits(t, b, bd["tile_seq"].shape[0], inp.attn.block_tables.shape[1]):
            return None
        caps = self.buf.seq_caps(tokens)
        return tokens, caps[bisect.bisect_left(caps, b)]

    def run(self, inp, key: tuple[int, int]) -> torch.Tensor:
        """Replay the graph `key` (from bucket()); returns logits [B, V] for the step's sequences."""
        self.buf.fill(inp, *key)
        self.graphs[key].replay()
        self.replays += 1
        return self.runner.model.compute_logits(self.last_hidden[:len(inp.req_ids)])
