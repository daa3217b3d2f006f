"""CUDA graphs for decode steps: one graph per batch-size bucket, replayed with padded inputs;
and for mixed steps (prompt chunks): one graph per token-count bucket (PrefillGraphRunner below).

A decode step of B sequences runs the graph of the smallest bucket >= B. Inputs are copied into
static buffers; padding rows read token 0 at position 0, write their KV into the reserved null
block and have seq_len 0, so they attend to nothing and change nothing. The graph covers the
model forward and the LM head; sampling stays outside (its work depends on the requests'
parameters). Only the one-stage case is captured (pipelines run eagerly).
The runner's attention backend owns the attention plan's buffers (tile plans, split workspaces):
these runners keep the common inputs and ask the backend for the rest (layers/attention/backend.py).
"""
from __future__ import annotations

import bisect
import logging

import torch

from meshserve import kernels
from meshserve.layers.attention.backend import AttentionMetadata

logger = logging.getLogger(__name__)


def default_batch_sizes(max_bs: int) -> list[int]:
    sizes = [1, 2, 4] + list(range(8, 64, 8)) + list(range(64, 257, 16)) + list(range(288, 1025, 32))
    return sorted({s for s in sizes if s < max_bs} | {max_bs})


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
        self.backend = runner.attn_backend
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
        self.backend.reserve_graph_buffers(n, n, decode=True)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.metadata: dict[int, AttentionMetadata] = {}
        self.replays = 0

    def _metadata(self, b: int) -> AttentionMetadata:
        common = AttentionMetadata(
            slot_mapping=self.slot_mapping[:b], query_start_loc=self.query_start_loc[:b + 1],
            seq_lens=self.seq_lens[:b], block_tables=self.block_tables[:b], max_query_len=1,
            max_seq_len=self.block_tables.shape[1] * self.runner.cfg.block_size,
            block_size=self.runner.cfg.block_size, num_decodes=b)
        return self.backend.graph_metadata(common, b, b, decode=True)

    @torch.no_grad()
    def capture(self, pool=None) -> None:
        model = self.runner.model
        pool = pool if pool is not None else torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.runner.device)
        for b in reversed(self.sizes):  # largest first, so smaller graphs reuse its memory
            md = self.metadata[b] = self._metadata(b)
            kernels.step_tokens(b)  # the launches this graph bakes in (PDL up to pdl_max_tokens)

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
        self.backend.fill_graph(md, self.metadata[padded], padded)
        self.graphs[padded].replay()
        self.replays += 1
        return self.logits[padded][:b]


def default_prefill_token_sizes(max_tokens: int) -> list[int]:
    """Token-count buckets for mixed (prefill) steps, up to max_tokens."""
    sizes = [16, 32, 64, 128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048, 3072, 4096]
    return sorted({s for s in sizes if s < max_tokens} | {max_tokens}) if max_tokens > 0 else []


PREFILL_SEQ_CAPS = (8, 32, 128)  # sequence-count sub-buckets below a token bucket's full capacity


class MixedStepBuffers:
    """Static inputs of a mixed step (prompt chunks, possibly with decode rows) padded to a fixed
    token count and sequence count, so one CUDA graph serves every step that fits.

    A graph has T tokens and S sequence slots (S <= T: each sequence has at least one token); the
    attention backend sizes its plan for that (Triton: S + ceil(T / block_q) query tiles, which
    bounds any such step's plan, with the block_q it gives a step of T tokens).
    Padding: tokens past the step's own read token 0 at position 0 and write their KV into the null
    block (slot 0); sequence slots past the step's have no queries and no context (query_start_loc
    stays at the step's token count, seq_len 0) and gather hidden row 0; the backend points its
    padding work at slot S, always such a padding slot, so it does nothing. Real rows therefore see
    exactly the inputs of an unpadded step; padding rows compute garbage that no real row reads.
    """

    def __init__(self, max_tokens: int, max_seqs: int, max_blocks: int, block_size: int, backend, device):
        self.max_tokens, self.block_size, self.backend = max_tokens, block_size, backend
        self.max_seqs = s = min(max_tokens, max_seqs)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.query_start_loc = torch.zeros(s + 2, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(s + 1, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(s + 1, max_blocks, dtype=torch.int32, device=device)
        self.logits_indices = torch.zeros(s, dtype=torch.int64, device=device)
        backend.reserve_graph_buffers(max_tokens, s, decode=False)
        self._metadata: dict[tuple[int, int], AttentionMetadata] = {}

    def seq_caps(self, tokens: int) -> list[int]:
        """The sequence-slot counts graphs of `tokens` tokens are captured with: a few small ones
        (fewer empty attention programs for steps with few sequences) and the full one."""
        full = min(tokens, self.max_seqs)
        return sorted({c for c in PREFILL_SEQ_CAPS if c < full} | {full})

    def metadata(self, tokens: int, seqs: int) -> AttentionMetadata:
        """Views of the buffers for a graph of `tokens` tokens and `seqs` slots (what it is captured
        with), the backend's plan buffers included; one object per graph."""
        md = self._metadata.get((tokens, seqs))
        if md is None:
            common = AttentionMetadata(
                slot_mapping=self.slot_mapping[:tokens], query_start_loc=self.query_start_loc[:seqs + 2],
                seq_lens=self.seq_lens[:seqs + 1], block_tables=self.block_tables[:seqs + 1],
                max_query_len=tokens, max_seq_len=self.block_tables.shape[1] * self.block_size,
                block_size=self.block_size)
            md = self._metadata[tokens, seqs] = self.backend.graph_metadata(common, tokens, seqs, decode=False)
        return md

    def fits(self, num_tokens: int, num_seqs: int, width: int) -> bool:
        """Whether a step's inputs fit the buffers (the backend judges its plan: graph_accepts)."""
        return (num_tokens <= self.max_tokens and num_seqs <= min(num_tokens, self.max_seqs)
                and width <= self.block_tables.shape[1])

    def fill(self, inp, tokens: int, seqs: int) -> None:
        """Copy a step's inputs (StepInputs, its metadata built by the backend) into the buffers,
        padded to a graph of `tokens` tokens and `seqs` sequence slots."""
        md = inp.attn
        t, b, s = inp.num_tokens, len(inp.req_ids), seqs
        self.input_ids[:t].copy_(inp.input_ids, non_blocking=True)
        self.positions[:t].copy_(inp.positions, non_blocking=True)
        self.slot_mapping[:t].copy_(md.slot_mapping, non_blocking=True)
        self.query_start_loc[:b + 1].copy_(md.query_start_loc, non_blocking=True)
        self.seq_lens[:b].copy_(md.seq_lens, non_blocking=True)
        self.block_tables[:b, :md.block_tables.shape[1]].copy_(md.block_tables, non_blocking=True)
        self.logits_indices[:b].copy_(inp.logits_indices, non_blocking=True)
        self.backend.fill_graph(md, self.metadata(tokens, seqs), seqs)
        if tokens > t:
            self.input_ids[t:tokens].zero_()
            self.positions[t:tokens].zero_()
            self.slot_mapping[t:tokens].zero_()
        self.query_start_loc[b + 1:s + 2].fill_(t)
        self.seq_lens[b:s + 1].zero_()
        self.logits_indices[b:s].zero_()  # the graph gathers all s rows: stale indices may be past `tokens`


class PrefillGraphRunner:
    """CUDA graphs for mixed steps (any step with a prompt chunk), one per (token-count bucket,
    sequence-slot bucket).

    An eager forward of a few hundred tokens costs the host more than the GPU (hundreds of kernel
    launches against ~11 ms of kernels for 467 tokens on the 8B shape), so a short prompt's first
    token waited for Python. The graph covers the model forward and the gather of each sequence's
    last hidden state; the LM head and sampling run after it on just the real rows.
    """

    def __init__(self, runner, token_sizes: list[int], max_seqs: int, max_seq_len: int):
        self.runner = runner
        self.backend = runner.attn_backend
        # The backend plans steps on either side of its boundaries differently (Triton: smaller
        # prefill tiles up to attn_prefill_large_tokens tokens), and a graph replays the plan it was
        # captured with: a boundary below the largest bucket is a bucket too, so no bucket holds
        # steps of two plans.
        top = max(token_sizes)
        self.sizes = sorted(set(token_sizes) | {t for t in self.backend.graph_token_boundaries() if t < top})
        bs = runner.cfg.block_size
        self.buf = MixedStepBuffers(self.sizes[-1], max_seqs, -(-max_seq_len // bs), bs, self.backend, runner.device)
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
            kernels.step_tokens(t)
            for s in reversed(self.buf.seq_caps(t)):
                md = self.buf.metadata(t, s)
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
        if not self.buf.fits(t, b, inp.attn.block_tables.shape[1]):
            return None
        caps = self.buf.seq_caps(tokens)
        seqs = caps[bisect.bisect_left(caps, b)]
        if not self.backend.graph_accepts(inp.attn, tokens, seqs):  # e.g. planned with other tiles
            return None
        return tokens, seqs

    def run(self, inp, key: tuple[int, int]) -> torch.Tensor:
        """Replay the graph `key` (from bucket()); returns logits [B, V] for the step's sequences."""
        self.buf.fill(inp, *key)
        self.graphs[key].replay()
        self.replays += 1
        return self.runner.model.compute_logits(self.last_hidden[:len(inp.req_ids)])
