"""The attention backend interface: a step's metadata, the backend that builds it and runs attention
over the paged KV cache, and the log-sum-exp merge of partial attentions.

One backend object per model runner, as vLLM's AttentionBackend with its metadata builder and
impl: InputBatch hands it each step's common metadata and query lengths (`build`), the result
travels down the model's forward call, and every Attention layer calls `md.backend.forward`. A
backend that supports CUDA graphs owns the static buffers of its plans; the graph runners
(worker/cuda_graph.py) own the common inputs and ask the backend for the rest.
KV cache of a layer: [2, num_blocks, block_size, num_kv_heads, head_dim].
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar, Optional, Sequence

import torch

from meshserve.kernels.settings import H200, KernelSettings


@dataclass(frozen=True)
class AttentionShape:
    """The local heads of this rank's attention layers (every layer of a model has the same)."""
    num_heads: int
    num_kv_heads: int
    head_dim: int

    @property
    def group(self) -> int:
        """Query heads per kv head (GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclass
class AttentionMetadata:
    """What every backend needs of a step; a backend's own metadata class adds its plan."""
    slot_mapping: torch.Tensor  # [T] int64; padding tokens write into the reserved null block 0
    query_start_loc: torch.Tensor  # [B+1] int32
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    max_query_len: int
    max_seq_len: int
    block_size: int
    num_decodes: int = 0  # the number of sequences when every one decodes a single token, else 0
    # [T] int32: the index (in its sequence's keys) of the last key each query row sees, -1 for none,
    # for rows whose keys are not the causal shape (context parallelism RING, context_parallel.py);
    # nondecreasing within a sequence. None: causal. Backends with supports_query_positions read it.
    query_positions: Optional[torch.Tensor] = None
    # models with several KV cache groups (engine/kv_spec.py): this step's metadata of groups 1..
    # (their own slot_mapping and block_tables), read by layers with Attention.kv_group > 0; None:
    # one group, or metadata built for every group at once (profiling, tests)
    group_views: Optional[list["AttentionMetadata"]] = None
    # the backend that built this metadata and runs attention with it; None (metadata built by
    # hand, as in tests): the torch reference
    backend: Optional["AttentionBackend"] = None

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


COMMON_FIELDS = tuple(f.name for f in fields(AttentionMetadata) if f.name != "backend")


def common_fields(md: AttentionMetadata) -> dict:
    """The common fields of `md`, to build a backend's metadata class from."""
    return {name: getattr(md, name) for name in COMMON_FIELDS}


class AttentionBackend(ABC):
    """Builds each step's metadata, runs attention with it, and (where supported) returns each
    query row's log-sum-exp and serves CUDA graphs."""
    name: ClassVar[str]
    supports_cuda_graphs: ClassVar[bool] = False
    supports_lse: ClassVar[bool] = False
    supports_query_positions: ClassVar[bool] = False  # honours AttentionMetadata.query_positions

    def __init__(self, shape: AttentionShape, block_size: int, device: torch.device,
                 settings: KernelSettings = H200):
        self.shape = shape
        self.block_size = block_size
        self.device = torch.device(device)
        self.settings = settings

    def build(self, common: AttentionMetadata, query_lens: Sequence[int]) -> AttentionMetadata:
        """This step's metadata from the runner's common part; query_lens: new tokens of each
        sequence, on the host. The default adds nothing but the backend itself."""
        common.backend = self
        return common

    def fuses_qk_norm(self, layer, rotary) -> bool:
        """Whether forward applies layer.qk_norm itself (fused with rotary); if not, the layer
        normalises q and k before calling forward."""
        return False

    @abstractmethod
    def forward(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, md: AttentionMetadata,
                rotary=None, positions: Optional[torch.Tensor] = None, return_lse: bool = False):
        """layer: the Attention layer (its kv_cache, scale, sliding_window).
        q: [T, H, D], k/v: [T, KVH, D], this step's tokens. Applies `rotary` (a RotaryEmbedding)
        at `positions` to q and k when given, writes k/v into layer.kv_cache at md.slot_mapping,
        then attends each query to its sequence's cached keys (causal; layer.sliding_window).
        Returns out [T, H, D]; with return_lse, (out, lse) where lse [T, H] (float32, or float64
        for float64 inputs) is log sum_j exp(layer.scale * q . k_j) over the keys the row sees
        (-inf for none), which is what merge_attention combines."""

    # ---- CUDA graphs (backends with supports_cuda_graphs) ------------------------------------
    def graph_token_boundaries(self) -> list[int]:
        """Token counts at which the plan of a mixed step changes shape; mixed-step graph buckets
        must include them, since a graph replays the plan it was captured with."""
        return []

    def reserve_graph_buffers(self, max_tokens: int, max_seqs: int, decode: bool) -> None:
        """Allocate the static plan buffers of every graph of one kind (decode: batch sizes up to
        max_seqs; mixed: steps of up to max_tokens tokens and max_seqs sequences), before capture."""
        raise NotImplementedError(f"the {self.name} attention backend does not run in CUDA graphs")

    def graph_metadata(self, common: AttentionMetadata, num_tokens: int, num_seqs: int,
                       decode: bool) -> AttentionMetadata:
        """The metadata a graph of `num_tokens` tokens and `num_seqs` sequence slots is captured
        with: `common` (views of the runner's static inputs) plus views of this backend's buffers."""
        raise NotImplementedError(f"the {self.name} attention backend does not run in CUDA graphs")

    def graph_accepts(self, md: AttentionMetadata, num_tokens: int, num_seqs: int) -> bool:
        """Whether a mixed step planned as `md` can replay the graph of that size."""
        raise NotImplementedError(f"the {self.name} attention backend does not run in CUDA graphs")

    def fill_graph(self, md: AttentionMetadata, graph_md: AttentionMetadata, num_seqs: int) -> None:
        """Copy the plan of the step `md` into the graph's buffers (`graph_md`, captured with
        `num_seqs` sequence slots), padded so that padding tiles do nothing."""
        raise NotImplementedError(f"the {self.name} attention backend does not run in CUDA graphs")


def merge_attention(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine attentions of the same queries over disjoint key sets (context-parallel partials):
    out = sum_i exp(lse_i - lse) * out_i with lse = log sum_i exp(lse_i). outs: [T, H, D] each,
    lses: [T, H] each. A row no partial saw a key for gives out 0 and lse -inf."""
    lse_all = torch.stack(list(lses))  # [P, T, H]
    lse = torch.logsumexp(lse_all, dim=0)  # [T, H]
    weights = torch.exp(lse_all - torch.where(torch.isinf(lse), 0.0, lse))  # [P, T, H]; 0 for -inf partials
    out = (weights[..., None] * torch.stack(list(outs)).to(weights.dtype)).sum(dim=0)  # [T, H, D]
    return out.to(outs[0].dtype), lse
