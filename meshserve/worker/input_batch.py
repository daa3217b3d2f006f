"""Per-request state a rank keeps between steps, and the tensors of one step built from it.

The state is a pure function of the SchedulerOutputs received: new requests bring all their
tokens and blocks, running ones bring what was appended. No rank needs to see sampled tokens
any other way, so every rank of every stage builds the same batch. The attention metadata of a
step is built by the rank's attention backend from the common part made here. A model with several
KV cache groups (engine/kv_spec.py) has a block table per group: their slot mappings and tables
ride in the metadata's `group_views`. Entries a sliding window has passed are set to the null block
here by the scheduler's rule (kv_spec's num_skipped_blocks), so no message has to carry them.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from meshserve.engine.kv_spec import KVCacheGroup
from meshserve.engine.messages import SamplingMeta, SchedulerOutput
from meshserve.layers.attention.backend import AttentionBackend, AttentionMetadata
from meshserve.layers.sampler import SamplingBatch, seed_for_step
from meshserve.utils import to_device

DISALLOWED = -1e30  # the bias of an id allowed_token_ids leaves out: finite, so a row all of whose
# allowed ids are also banned (min_tokens' stop ids) still samples rather than turning into NaN


@dataclass
class ReqState:
    token_ids: list[int]
    block_ids: list[int]
    num_prompt_tokens: int
    sampling: SamplingMeta
    group_block_ids: list[list[int]] = field(default_factory=list)  # tables of KV groups 1..


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # [B] last token of each request
    req_ids: list[str]
    # prompt logprobs: (req id, hidden-state indices, target token ids)
    prompt_lp: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    num_tokens: int = 0
    # overlap: (index in input_ids, request id) of tokens still being sampled by the previous step
    placeholders: list[tuple[int, str]] = field(default_factory=list)
    # context parallelism RING / HELIX: the [T] rows that see none of this rank's keys (`attn` is then
    # the metadata over its KV shard: layers/context_parallel.py ring_metadata); None otherwise
    ring_empty: Optional[torch.Tensor] = None


def grammar_banned(reqs, vocab_size: int, device: torch.device) -> torch.Tensor:
    """[B, V] True (on `device`) where a row's grammar (structured outputs) bans the id: its mask's
    bit is 0 (engine/messages.py ScheduledRequest.grammar_mask), or the id lies past the mask. Rows
    without a mask ban nothing. The packed words travel to the device (V / 8 bytes a row, not V)
    and are unpacked there."""
    words = -(-vocab_size // 32)
    packed = np.full((len(reqs), words), -1, dtype=np.int32)  # all bits set: nothing banned
    for row, sr in enumerate(reqs):
        if sr.grammar_mask:
            mask = np.frombuffer(sr.grammar_mask, dtype="<i4")[:words]
            packed[row] = 0  # ids past the mask are banned
            packed[row, :len(mask)] = mask
    dev = to_device(torch.from_numpy(packed), device)
    bits = (dev[:, :, None] >> torch.arange(32, dtype=torch.int32, device=dev.device)) & 1
    return (bits == 0).reshape(len(reqs), words * 32)[:, :vocab_size]


def _pad_rows(rows: list[list[int]]) -> np.ndarray:
    """[B, max len] int32, zero-padded, in one vectorized scatter."""
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    total = int(lengths.sum())
    table = np.zeros((len(rows), max(1, int(lengths.max(initial=1)))), dtype=np.int32)
    if total:
        flat = np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int32, count=total)
        row = np.repeat(np.arange(len(rows)), lengths)
        col = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        table[row, col] = flat
    return table


def _extend_slots(slots: list[int], bids: list[int], start: int, n: int, bs: int) -> None:
    """Append the cache slots of positions start .. start + n - 1 under block table `bids`."""
    if n <= 64:  # decode and short chunks: plain ints beat numpy's per-call cost
        slots.extend(bids[q // bs] * bs + q % bs for q in range(start, start + n))
    else:
        p = np.arange(start, start + n)
        slots.extend((np.asarray(bids, dtype=np.int64)[p // bs] * bs + p % bs).tolist())


class InputBatch:
    def __init__(self, block_size: int, device: torch.device, vocab_size: int, attn_backend: AttentionBackend,
                 kv_groups: Sequence[KVCacheGroup] = ()):
        self.block_size = block_size
        self.device = device
        self.vocab_size = vocab_size
        self.attn_backend = attn_backend  # builds each step's attention metadata (its tile plan, ...)
        self.num_groups = max(1, len(kv_groups))
        # (group, spec) of the groups that drop blocks behind a sliding window
        self.windowed = [(g, grp.spec) for g, grp in enumerate(kv_groups) if grp.sliding_window is not None]
        self.reqs: dict[str, ReqState] = {}
        # context parallelism RING / HELIX: (cp rank, cp size); the metadata is over the rank's KV shard
        self.ring: Optional[tuple[int, int]] = None

    def update(self, so: SchedulerOutput) -> None:
        for rid in so.finished_req_ids:
            self.reqs.pop(rid, None)
        grouped, windowed = self.num_groups > 1, self.windowed
        for sr in so.reqs:
            if sr.sampling is not None:
                st = self.reqs[sr.req_id] = ReqState(list(sr.new_token_ids), list(sr.new_block_ids),
                                                     len(sr.new_token_ids) - sr.num_output_tokens, sr.sampling,
                                                     [list(t) for t in sr.new_group_block_ids])
            else:
                st = self.reqs[sr.req_id]
                st.token_ids.extend(sr.new_token_ids)
                st.block_ids.extend(sr.new_block_ids)
                if grouped:
                    for table, new in zip(st.group_block_ids, sr.new_group_block_ids):
                        table.extend(new)
            if windowed:
                self._null_skipped(st, sr.num_computed_tokens)

    def _null_skipped(self, st: ReqState, num_computed_tokens: int) -> None:
        """Point the entries each sliding window no longer reads at the null block, as the
        scheduler did when it freed them (a prefix of the table: walk down to the first null)."""
        for g, spec in self.windowed:
            table = st.block_ids if g == 0 else st.group_block_ids[g - 1]
            i = min(spec.num_skipped_blocks(num_computed_tokens, self.block_size), len(table))
            while i > 0 and table[i - 1] != 0:
                i -= 1
                table[i] = 0

    def prepare(self, so: SchedulerOutput) -> StepInputs:
        bs = self.block_size
        ids: list[int] = []
        pos: list[int] = []
        slots: list[int] = []
        q_loc = [0]
        seq_lens: list[int] = []
        tables: list[list[int]] = []
        grouped = self.num_groups > 1
        group_slots: list[list[int]] = [[] for _ in range(self.num_groups - 1)]  # groups 1..
        group_tables: list[list[list[int]]] = [[] for _ in range(self.num_groups - 1)]
        prompt_lp = []
        placeholders = []
        num_decodes = 0
        for sr in so.reqs:
            st = self.reqs[sr.req_id]
            start, n = sr.num_computed_tokens, sr.num_new_tokens
            known = st.token_ids[start:start + n]
            ids.extend(known)
            for k in range(len(known), n):  # not sampled yet when this step was scheduled
                placeholders.append((len(ids), sr.req_id))
                ids.append(0)
            pos.extend(range(start, start + n))
            if n == 1:  # decode: no call
                slots.append(st.block_ids[start // bs] * bs + start % bs)
            else:
                _extend_slots(slots, st.block_ids, start, n, bs)
            if grouped:
                for g, bids in enumerate(st.group_block_ids):
                    _extend_slots(group_slots[g], bids, start, n, bs)
                    group_tables[g].append(bids)
            q_loc.append(q_loc[-1] + n)
            seq_lens.append(start + n)
            tables.append(st.block_ids)
            num_decodes += n == 1
            if st.sampling.prompt_logprobs is not None and start < st.num_prompt_tokens - 1:
                end = min(start + n, st.num_prompt_tokens - 1)
                prompt_lp.append((sr.req_id, list(range(q_loc[-2], q_loc[-2] + end - start)),
                                  st.token_ids[start + 1:end + 1]))
        table = _pad_rows(tables)
        dev = self.device

        def to_dev(x, dtype):
            return to_device(torch.as_tensor(np.asarray(x), dtype=dtype), dev)

        q_lens = np.diff(q_loc)
        ring_empty = None
        if self.ring is not None:  # attention reads this cp rank's shard of the KV cache
            from meshserve.layers.context_parallel import ring_metadata
            md, ring_empty = ring_metadata(np.asarray(pos), np.repeat(np.arange(len(q_lens)), q_lens), table, bs,
                                           *self.ring, self.attn_backend, dev)
        else:
            md = self.attn_backend.build(AttentionMetadata(
                slot_mapping=to_dev(slots, torch.int64),
                query_start_loc=to_dev(q_loc, torch.int32),
                seq_lens=to_dev(seq_lens, torch.int32),
                block_tables=to_device(torch.from_numpy(table), dev),
                max_query_len=int(q_lens.max()) if len(q_lens) else 0,
                max_seq_len=max(seq_lens, default=0),
                block_size=bs,
                num_decodes=num_decodes if num_decodes == len(so.reqs) else 0,
            ), q_lens)
        if group_tables:
            md.group_views = [dataclasses.replace(md, slot_mapping=to_dev(s, torch.int64),
                                                  block_tables=to_device(torch.from_numpy(_pad_rows(t)), dev))
                              for s, t in zip(group_slots, group_tables)]
        return StepInputs(
            input_ids=to_dev(ids, torch.int64), positions=to_dev(pos, torch.int64), attn=md,
            logits_indices=to_dev(np.asarray(q_loc[1:]) - 1, torch.int64),
            req_ids=[sr.req_id for sr in so.reqs], prompt_lp=prompt_lp, num_tokens=len(ids),
            placeholders=placeholders, ring_empty=ring_empty)

    def sampling_batch(self, so: SchedulerOutput) -> SamplingBatch:
        dev, V = self.device, self.vocab_size
        states = [self.reqs[sr.req_id] for sr in so.reqs]
        metas = [st.sampling for st in states]
        temps = [m.temperature for m in metas]
        b = SamplingBatch(temperature=to_device(torch.tensor(temps, dtype=torch.float32), dev))
        b.all_greedy = all(t < 1e-5 or m.top_k == 1 for t, m in zip(temps, metas))
        if not b.all_greedy:
            if any(m.top_k > 0 for m in metas):
                ks = [m.top_k if m.top_k > 0 else V for m in metas]
                b.top_k, b.max_top_k = to_device(torch.tensor(ks), dev), max(ks)
                b.temperature = torch.where(b.top_k == 1, torch.zeros_like(b.temperature), b.temperature)
            if any(m.top_p < 1.0 for m in metas):
                b.top_p = to_device(torch.tensor([m.top_p for m in metas], dtype=torch.float32), dev)
            if any(m.min_p > 0.0 for m in metas):
                b.min_p = to_device(torch.tensor([m.min_p for m in metas], dtype=torch.float32), dev)
            for row, (sr, m) in enumerate(zip(so.reqs, metas)):
                if m.seed is not None and m.temperature >= 1e-5:
                    b.seeded_rows.append((row, seed_for_step(m.seed, sr.num_output_tokens)))
        else:
            b.temperature.zero_()
        if any(m.logit_bias or m.allowed_token_ids for m in metas):
            bias = torch.zeros(len(metas), V, dtype=torch.float32)
            for row, m in enumerate(metas):
                if m.allowed_token_ids:  # vLLM's allowed_token_ids: every other id out of reach
                    bias[row] = DISALLOWED
                    bias[row, torch.tensor(m.allowed_token_ids)] = 0.0
                for tok, val in (m.logit_bias or {}).items():
                    bias[row, tok] += val
            b.logit_bias = to_device(bias, dev)
        # min_tokens: stop ids are banned while fewer outputs exist than asked for. The count comes
        # from the scheduler (outputs known or in flight), so this is right under overlap too, where
        # the worker's own token list lags a step behind.
        rows, cols = [], []
        for row, (sr, m) in enumerate(zip(so.reqs, metas)):
            if m.min_tokens and m.stop_ids and sr.num_output_tokens < m.min_tokens:
                rows += [row] * len(m.stop_ids)
                cols += m.stop_ids
            if sr.banned_ids:  # bad_words (the scheduler's bans for this step)
                rows += [row] * len(sr.banned_ids)
                cols += sr.banned_ids
        if rows:
            mask = torch.zeros(len(metas), V, dtype=torch.bool, device=dev)
            mask[to_device(torch.tensor(rows), dev), to_device(torch.tensor(cols), dev)] = True
            b.banned_mask = mask
        if any(sr.grammar_mask for sr in so.reqs):
            grammar = grammar_banned(so.reqs, V, dev)
            b.banned_mask = grammar if b.banned_mask is None else b.banned_mask | grammar
        if any(m.repetition_penalty != 1.0 or m.presence_penalty or m.frequency_penalty for m in metas):
            counts = torch.zeros(len(metas), V, dtype=torch.float32)
            seen = torch.zeros(len(metas), V, dtype=torch.bool)
            for row, st in enumerate(states):
                out = torch.tensor(st.token_ids[st.num_prompt_tokens:], dtype=torch.int64)
                counts[row].index_add_(0, out, torch.ones(len(out)))
                seen[row, torch.tensor(st.token_ids, dtype=torch.int64)] = True
            b.output_counts, b.seen_mask = to_device(counts, dev), to_device(seen, dev)
            b.repetition_penalty = to_device(torch.tensor([m.repetition_penalty for m in metas]), dev)
            b.presence_penalty = to_device(torch.tensor([m.presence_penalty for m in metas]), dev)
            b.frequency_penalty = to_device(torch.tensor([m.frequency_penalty for m in metas]), dev)
        b.max_num_logprobs = max((m.logprobs for m in metas if m.logprobs is not None), default=-1)
        return b
