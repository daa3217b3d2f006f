"""Reading and writing a request's tokens in a KV cache tensor, independent of its block size.

A transfer buffer holds tokens [t0, t1) of one layer, token-major, contiguous on the CPU:
- full attention (cache [2, num_blocks, block_size, heads, head_dim]): [2, t1 - t0, h1 - h0, head_dim]
  (K then V; heads h0..h1 of this rank's local heads);
- latent (cache [num_blocks, block_size, latent_dim]): [t1 - t0, latent_dim].
Token t of a request lives in block `block_ids[t // block_size]` at offset `t % block_size`, so a
buffer gathered with one block size scatters into blocks of any other. CUDA caches go through
pinned host memory (synchronous copies). Pure torch.

A rank of a server with context parallelism RING (layers/context_parallel.py) holds only its
sub-block of each block: with cp = (rank, size) and B = block_size // size, token t is its own when
t % block_size // B == rank, at slot block_ids[t // block_size] * B + t % B (`dest_slots`); a
buffer scattered into such a rank keeps those tokens and drops the others.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from meshserve.kernels.fp8 import storage_view  # FP8 caches copy as bytes (no CPU index_copy_ for FP8)


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> "bfloat16" (RankLayout.dtype)."""
    return str(dtype).removeprefix("torch.")


def torch_dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def cache_kind(cache: torch.Tensor) -> str:
    """"full" for a 5-d [2, blocks, block_size, heads, dim] cache, "latent" for [blocks, block_size, dim]."""
    if cache.dim() == 5 and cache.shape[0] == 2:
        return "full"
    if cache.dim() == 3:
        return "latent"
    raise ValueError(f"a KV cache tensor of shape {tuple(cache.shape)} is neither full attention "
                     f"[2, blocks, block_size, heads, dim] nor latent [blocks, block_size, dim]")


def buffer_shape(cache: torch.Tensor, num_tokens: int, heads: Optional[tuple[int, int]] = None) -> tuple[int, ...]:
    """The shape of a buffer of `num_tokens` tokens (heads: local [h0, h1), default all) of `cache`."""
    if cache_kind(cache) == "latent":
        return (num_tokens, cache.shape[2])
    h0, h1 = heads if heads is not None else (0, cache.shape[3])
    return (2, num_tokens, h1 - h0, cache.shape[4])


def token_slots(block_ids: Sequence[int], block_size: int, t0: int, t1: int, num_blocks: int) -> torch.Tensor:
    """Flat slot index (block * block_size + offset) of tokens t0..t1-1; a ValueError when the
    blocks do not cover them or a block id is out of range."""
    if not 0 <= t0 <= t1:
        raise ValueError(f"bad token range [{t0}, {t1})")
    if t1 > len(block_ids) * block_size:
        raise ValueError(f"{len(block_ids)} blocks of {block_size} tokens do not hold {t1} tokens")
    first, last = t0 // block_size, -(-t1 // block_size)
    blocks = torch.tensor(list(block_ids[first:max(first, last)]), dtype=torch.long)
    if blocks.numel() and (int(blocks.min()) < 0 or int(blocks.max()) >= num_blocks):
        raise ValueError(f"block ids out of range [0, {num_blocks})")
    pos = torch.arange(t0, t1, dtype=torch.long)
    return blocks[pos // block_size - first] * block_size + pos % block_size


def dest_slots(block_ids: Sequence[int], block_size: int, t0: int, t1: int, num_blocks: int,
               cp: tuple[int, int] = (0, 1)) -> tuple[Optional[torch.Tensor], torch.Tensor]:
    """Where tokens t0..t1-1 go in a cache of a rank holding sub-block cp[0] of cp[1] of every block
    (blocks of `block_size` tokens in the scheduler, block_size // cp[1] in the cache): (rows, slots),
    rows the indices in [0, t1 - t0) of the tokens it holds (None: all of them, cp[1] == 1) and slots
    their flat slot indices. A ValueError as token_slots'."""
    rank, size = cp
    if size == 1:
        return None, token_slots(block_ids, block_size, t0, t1, num_blocks)
    if block_size % size or not 0 <= rank < size:
        raise ValueError(f"cp {cp} does not split blocks of {block_size} tokens")
    token_slots(block_ids, block_size, t0, t1, num_blocks * size)  # the same coverage checks
    sub = block_size // size
    pos = torch.arange(t0, t1, dtype=torch.long)
    rows = torch.nonzero(pos % block_size // sub == rank).flatten()
    kept = pos[rows]
    blocks = torch.tensor(list(block_ids), dtype=torch.long)[kept // block_size] if kept.numel() else kept
    if blocks.numel() and int(blocks.max()) >= num_blocks:
        raise ValueError(f"block ids out of range [0, {num_blocks})")
    return rows, blocks * sub + kept % sub


def geometry(cache: torch.Tensor) -> tuple[str, int, int]:
    """(kind, num_blocks, block_size) of a cache tensor."""
    kind = cache_kind(cache)
    return (kind, cache.shape[0], cache.shape[1]) if kind == "latent" else (kind, cache.shape[1], cache.shape[2])


def _flat(cache: torch.Tensor) -> torch.Tensor:
    """The cache viewed with blocks and offsets as one slot dimension."""
    if cache_kind(cache) == "latent":
        return cache.view(cache.shape[0] * cache.shape[1], cache.shape[2])
    return cache.view(2, cache.shape[1] * cache.shape[2], cache.shape[3], cache.shape[4])


def _check_heads(cache: torch.Tensor, heads: Optional[tuple[int, int]]) -> tuple[int, int]:
    h0, h1 = heads if heads is not None else (0, cache.shape[3])
    if not 0 <= h0 < h1 <= cache.shape[3]:
        raise ValueError(f"heads [{h0}, {h1}) outside this cache's {cache.shape[3]} heads")
    return h0, h1


def gather(cache: torch.Tensor, block_ids: Sequence[int], block_size: int, t0: int, t1: int,
           heads: Optional[tuple[int, int]] = None, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tokens [t0, t1) (heads: local [h0, h1) of a full cache, default all) into a contiguous buffer:
    `out` if given (buffer_shape, the cache's dtype; host memory, or the cache's GPU for a channel
    that sends GPU memory), else a CPU one."""
    kind, num_blocks, cache_block_size = geometry(cache)
    if cache_block_size != block_size:
        raise ValueError(f"block_size {block_size} is not the cache's {tuple(cache.shape)}")
    flat = _flat(cache)
    idx = token_slots(block_ids, block_size, t0, t1, num_blocks)
    if kind == "latent":
        part = flat.index_select(0, idx.to(cache.device))
    else:
        h0, h1 = _check_heads(cache, heads)
        part = flat[:, :, h0:h1].index_select(1, idx.to(cache.device))
    if out is None:
        if cache.device.type == "cpu":
            return part.contiguous()
        out = torch.empty(part.shape, dtype=cache.dtype, pin_memory=torch.cuda.is_available())
    out.copy_(part)
    return out


def scatter(cache: torch.Tensor, buf: torch.Tensor, block_ids: Sequence[int], block_size: int, t0: int,
            heads: Optional[tuple[int, int]] = None, non_blocking: bool = False,
            cp: tuple[int, int] = (0, 1)) -> None:
    """Write a buffer of tokens [t0, t0 + n) (heads: local [h0, h1) of a full cache, default all)
    into the cache's blocks `block_ids` (of `block_size` tokens; with cp = (rank, size) of context
    parallelism RING, only the tokens this rank holds, into blocks of block_size // size). non_blocking:
    a host buffer's copy to the GPU is queued on the current stream (the caller keeps the buffer
    until it has run)."""
    kind, num_blocks, cache_block_size = geometry(cache)
    if cache_block_size * cp[1] != block_size:
        raise ValueError(f"block_size {block_size} (cp {cp}) is not the cache's {tuple(cache.shape)}")
    n = buf.shape[0 if kind == "latent" else 1]
    expected = buffer_shape(cache, n, heads)
    if tuple(buf.shape) != expected or buf.dtype != cache.dtype:
        raise ValueError(f"buffer {tuple(buf.shape)} {buf.dtype} does not fit {expected} {cache.dtype}")
    flat = _flat(cache)
    rows, idx = dest_slots(block_ids, block_size, t0, t0 + n, num_blocks, cp)
    if rows is not None:
        buf = buf.index_select(0 if kind == "latent" else 1, rows)
    src = buf.to(cache.device, non_blocking=non_blocking)
    idx = idx.to(cache.device, non_blocking=non_blocking)
    if kind == "latent":
        storage_view(flat).index_copy_(0, idx, storage_view(src))
    else:
        h0, h1 = _check_heads(cache, heads)
        storage_view(flat[:, :, h0:h1]).index_copy_(1, idx, storage_view(src))


def copy_slots(src: torch.Tensor, src_idx: torch.Tensor, src_heads: Optional[tuple[int, int]], dst: torch.Tensor,
               dst_idx: torch.Tensor, dst_heads: Optional[tuple[int, int]]) -> int:
    """Copy the slots `src_idx` (flat slot indices; heads: local [h0, h1) of a full cache) of cache
    `src` into the slots `dst_idx` of cache `dst` (any block sizes), device to device, on the current
    stream; the bytes copied."""
    if cache_kind(src) != cache_kind(dst) or src.dtype != dst.dtype:
        raise ValueError(f"cannot copy a {tuple(src.shape)} {src.dtype} cache into a {tuple(dst.shape)} "
                         f"{dst.dtype} one")
    sf, df = _flat(src), _flat(dst)
    latent = cache_kind(src) == "latent"
    if not latent:
        h0, h1 = _check_heads(src, src_heads)
        g0, g1 = _check_heads(dst, dst_heads)
        if h1 - h0 != g1 - g0:
            raise ValueError(f"heads [{h0}, {h1}) do not fit heads [{g0}, {g1})")
    n = src_idx.numel()
    if src.is_cuda and dst.is_cuda and use_triton_copy() and _rows_contiguous(sf) and _rows_contiguous(df):
        # one pass, slot to slot (kernels/kv_copy.py): a token's heads are one contiguous run
        from meshserve.kernels.kv_copy import copy_rows
        if latent:
            row, so, do = sf.shape[1], 0, 0
        else:
            d = sf.shape[3]
            row, so, do = (h1 - h0) * d, h0 * d, g0 * d
        copy_rows(sf, src_idx.to(torch.int64), so, df, dst_idx.to(torch.int64), do, row)
        return (1 if latent else 2) * n * row * src.element_size()
    if latent:
        part = sf.index_select(0, src_idx)
        storage_view(df).index_copy_(0, dst_idx, storage_view(part))
    else:
        part = sf[:, :, h0:h1].index_select(1, src_idx)
        storage_view(df[:, :, g0:g1]).index_copy_(1, dst_idx, storage_view(part))
    return part.numel() * part.element_size()


def _rows_contiguous(flat: torch.Tensor) -> bool:
    """Each slot's values (heads x dim, or the latent row) are one contiguous run."""
    return flat.stride(-1) == 1 and (flat.dim() == 2 or flat.stride(2) == flat.shape[3])


def use_triton_copy() -> bool:
    """copy_slots takes the Triton kernel for CUDA caches (kernel_config.disable_triton: torch ops)."""
    from meshserve import kernels
    return kernels.TRITON_AVAILABLE
