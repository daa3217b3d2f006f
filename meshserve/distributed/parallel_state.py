"""Process groups for one rank, built from a `Mapping` once torch.distributed is up.

`init_distributed` joins the default process group; `ParallelState(mapping)` then creates every
group of every parallel dimension (each rank takes part in every `new_group` call, in the same
order, as torch requires) and keeps this rank's `GroupCoordinator` for each. Layers are handed a
coordinator (`state.tp`, `state.moe_ep`, ...); nothing here is module-level state.
"""
from __future__ import annotations

import datetime
import logging

import torch
import torch.distributed as dist

from meshserve.distributed.comm import DIMENSIONS
from meshserve.mapping import Mapping

logger = logging.getLogger(__name__)

__all__ = ["GroupCoordinator", "ParallelState", "init_distributed", "destroy_distributed"]

DEFAULT_TIMEOUT_S = 600.0

# torch >= 2.12 renamed all_gather_into_tensor (the old name warns); older releases lack the new one.
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class GroupCoordinator:
    """This rank's view of one process group: its members and the collectives layers use.

    `device_group` carries tensors on the compute device (NCCL on GPU, gloo on CPU); `cpu_group`
    is always gloo, for small host-side metadata and barriers. Ranks given to `broadcast`, `send`
    and `recv` are ranks *in the group* (0..size-1). With size == 1 every collective returns its
    input unchanged and send/recv do nothing, so a layer need not special-case an unsplit
    dimension.
    """

    def __init__(self, name: str, ranks: list[int], rank: int, device_group: object | None,
                 cpu_group: object | None):
        if rank not in ranks:
            raise ValueError(f"rank {rank} is not a member of {name} group {ranks}")
        self.name = name
        self.ranks = list(ranks)
        self.rank = rank
        self.rank_in_group = self.ranks.index(rank)
        self.size = len(self.ranks)
        self.device_group = device_group
        self.cpu_group = cpu_group

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def is_last_rank(self) -> bool:
        return self.rank_in_group == self.size - 1

    @property
    def next_rank(self) -> int:
        """Rank in group of the next member (wraps around)."""
        return (self.rank_in_group + 1) % self.size

    @property
    def prev_rank(self) -> int:
        """Rank in group of the previous member (wraps around)."""
        return (self.rank_in_group - 1) % self.size

    def _global(self, rank_in_group: int, what: str) -> int:
        if not 0 <= rank_in_group < self.size:
            raise ValueError(f"{what}={rank_in_group} is out of range for the {self.name} group "
                             f"of size {self.size} (accepted: 0..{self.size - 1})")
        return self.ranks[rank_in_group]

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the group, in place; returns `tensor`."""
        if self.size == 1:
            return tensor
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.device_group)
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Concatenate every member's `tensor` along `dim`, in rank-in-group order."""
        if tensor.dim() == 0:
            raise ValueError("all_gather needs a tensor with at least one dimension")
        if self.size == 1:
            return tensor
        dim = dim % tensor.dim()
        flat = tensor.contiguous().view(-1)
        # gloo wants the output as the inputs concatenated on dim 0, so gather flat
        out = torch.empty(self.size * flat.numel(), dtype=tensor.dtype, device=tensor.device)
        _all_gather_flat(out, flat, group=self.device_group)
        # [size, *shape] -> shape with dim scaled by size, members in order along dim
        out = out.view(self.size, *tensor.shape).movedim(0, dim)
        return out.reshape(*tensor.shape[:dim], self.size * tensor.shape[dim],
                           *tensor.shape[dim + 1:])

    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Sum over the group, then keep this member's slice of `dim` (size must divide it):
        the inverse of `all_gather` along the same dim. Returns a new tensor."""
        if self.size == 1:
            return tensor
        dim = dim % tensor.dim()
        if tensor.shape[dim] % self.size:
            raise ValueError(f"reduce_scatter: dim {dim} of size {tensor.shape[dim]} is not divisible by the "
                             f"{self.name} group size {self.size}")
        chunk = tensor.shape[dim] // self.size
        if self.backend_name == "gloo":
            # gloo has no reduce_scatter_tensor: all-reduce a copy and keep our slice
            summed = tensor.clone()
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=self.device_group)
            return summed.narrow(dim, self.rank_in_group * chunk, chunk).contiguous()
        moved = tensor.movedim(dim, 0).contiguous()  # members' slices contiguous along dim 0
        out = torch.empty((chunk, *moved.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.reduce_scatter_tensor(out, moved, op=dist.ReduceOp.SUM, group=self.device_group)
        return out.movedim(0, dim).contiguous()

    def all_to_all(self, tensor: torch.Tensor, output_split_sizes: list[int] | None = None,
                   input_split_sizes: list[int] | None = None) -> torch.Tensor:
        """Exchange rows (dim 0): member i gets rows input_split_sizes[i] of ours; we get
        output_split_sizes[j] rows from member j, in member order. Without split sizes the rows
        split evenly. Returns a new tensor of sum(output_split_sizes) rows."""
        if self.size == 1:
            return tensor.clone()
        if (output_split_sizes is None) != (input_split_sizes is None):
            raise ValueError("all_to_all: give both output_split_sizes and input_split_sizes, or neither")
        if input_split_sizes is None:
            if tensor.shape[0] % self.size:
                raise ValueError(f"all_to_all: {tensor.shape[0]} rows do not split evenly over the "
                                 f"{self.name} group size {self.size}; pass split sizes")
            rows = tensor.shape[0]
        else:
            for name, sizes in (("input_split_sizes", input_split_sizes), ("output_split_sizes", output_split_sizes)):
                if len(sizes) != self.size:
                    raise ValueError(f"all_to_all: {name} has {len(sizes)} entries for a {self.name} group "
                                     f"of size {self.size}")
            if sum(input_split_sizes) != tensor.shape[0]:
                raise ValueError(f"all_to_all: input_split_sizes sum to {sum(input_split_sizes)}, the tensor "
                                 f"has {tensor.shape[0]} rows")
            rows = sum(output_split_sizes)
        out = torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
        dist.all_to_all_single(out, tensor.contiguous(), output_split_sizes, input_split_sizes,
                               group=self.device_group)
        return out

    @property
    def backend_name(self) -> str:
        return str(dist.get_backend(self.device_group))

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Copy member `src`'s tensor into every member's `tensor`, in place; returns it."""
        src_rank = self._global(src, "src")
        if self.size == 1:
            return tensor
        dist.broadcast(tensor, src=src_rank, group=self.device_group)
        return tensor

    def send(self, tensor: torch.Tensor, dst: int) -> None:
        """Blocking send to member `dst` (rank in group)."""
        dst_rank = self._global(dst, "dst")
        if self.size == 1:
            return
        dist.send(tensor.contiguous(), dst=dst_rank, group=self.device_group)

    def recv(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Blocking receive from member `src` (rank in group) into `tensor`; returns it."""
        src_rank = self._global(src, "src")
        if self.size == 1:
            return tensor
        dist.recv(tensor, src=src_rank, group=self.device_group)
        return tensor

    def barrier(self) -> None:
        if self.size == 1:
            return
        dist.barrier(group=self.cpu_group)

    def __repr__(self) -> str:
        return (f"GroupCoordinator({self.name}, ranks={self.ranks}, "
                f"rank_in_group={self.rank_in_group})")


class ParallelState:
    """Every parallel dimension's `GroupCoordinator` for this rank.

    Attributes: world, tp, pp, cp, moe_tp, moe_ep, attn_tp, attn_dp. Build it on every rank with
    the same Mapping layout after `init_distributed`; `backend` (default: the default group's)
    is used for device groups.
    """

    def __init__(self, mapping: Mapping, backend: str | None = None,
                 timeout_s: float | None = None):
        if not dist.is_initialized():
            raise RuntimeError("ParallelState needs torch.distributed initialised first "
                               "(call init_distributed)")
        if dist.get_world_size() != mapping.world_size or dist.get_rank() != mapping.rank:
            raise ValueError(
                f"Mapping(world_size={mapping.world_size}, rank={mapping.rank}) does not match "
                f"torch.distributed (world_size={dist.get_world_size()}, rank={dist.get_rank()})")
        self.mapping = mapping
        self.backend = backend or str(dist.get_backend())
        timeout = None if timeout_s is None else datetime.timedelta(seconds=timeout_s)
        self._created: list[object] = []
        # Identical rank lists (tp and attn_tp, say) share one pair of groups. Every rank walks
        # the same lists in the same order, so the cache hits on the same calls everywhere.
        all_ranks = tuple(range(mapping.world_size))
        cpu_world = (dist.group.WORLD if self.backend == "gloo"
                     else self._new_group(list(all_ranks), "gloo", timeout))
        self._cache: dict[tuple[int, ...], tuple[object, object]] = {
            all_ranks: (dist.group.WORLD, cpu_world)}
        self.world = GroupCoordinator("world", list(all_ranks), mapping.rank,
                                      *self._cache[all_ranks])
        for name in DIMENSIONS:
            setattr(self, name, self._build(name, getattr(mapping, f"{name}_groups"), timeout))
        # attention DP: the step's token counts of the attn_dp ranks, which the MoE layers gather
        # over (layers/dp_attention.py DpTokens, set by the model runner; None without attention DP)
        self.dp_tokens = None
        # context parallelism: the step's token split over the cp group (layers/context_parallel.py
        # CpSplit, set by the model runner; None without cp)
        self.cp_split = None

    def _new_group(self, ranks: list[int], backend: str, timeout: datetime.timedelta | None):
        kwargs = {} if timeout is None else {"timeout": timeout}
        group = dist.new_group(ranks, backend=backend, **kwargs)
        self._created.append(group)
        return group

    def _build(self, name: str, groups: list[list[int]],
               timeout: datetime.timedelta | None) -> GroupCoordinator:
        mine = None
        for ranks in groups:
            key = tuple(ranks)
            if key not in self._cache:
                device_group = self._new_group(ranks, self.backend, timeout)
                cpu_group = (device_group if self.backend == "gloo"
                             else self._new_group(ranks, "gloo", timeout))
                self._cache[key] = (device_group, cpu_group)
            if self.mapping.rank in ranks:
                mine = GroupCoordinator(name, ranks, self.mapping.rank, *self._cache[key])
        assert mine is not None, f"rank {self.mapping.rank} is in no {name} group"
        return mine

    def destroy(self) -> None:
        """Destroy the subgroups this object created (not the default group)."""
        for group in self._created:
            # a rank outside a group holds GroupMember.NON_GROUP_MEMBER, nothing to destroy
            if isinstance(group, dist.ProcessGroup):
                dist.destroy_process_group(group)
        self._created.clear()
        self._cache.clear()


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int,
                     backend: str, local_rank: int | None = None,
                     timeout_s: float = DEFAULT_TIMEOUT_S, store: object | None = None) -> torch.device:
    """Join the default process group over TCP and return this rank's compute device.

    `store`: a TCPStore already connected to rank 0's (the spawning executor makes one first, so
    that it can watch its children check in before it blocks in the rendezvous); without one the
    group rendezvouses at tcp://master_addr:master_port.

    With backend "nccl" the rank is pinned to cuda:local_rank (default: rank modulo the visible
    device count) before the group is created, as NCCL requires.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is out of range for world_size={world_size}")
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend 'nccl' needs a CUDA device; use 'gloo' on CPU")
        if local_rank is None:
            local_rank = rank % torch.cuda.device_count()
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    host = f"[{master_addr}]" if ":" in master_addr else master_addr
    where = {"store": store} if store is not None else {"init_method": f"tcp://{host}:{master_port}"}
    dist.init_process_group(backend=backend, world_size=world_size, rank=rank,
                            timeout=datetime.timedelta(seconds=timeout_s), **where)
    logger.debug("rank %d/%d joined %s process group at %s:%d", rank, world_size, backend,
                 master_addr, master_port)
    return device


def destroy_distributed() -> None:
    """Leave the default process group (and with it every subgroup), if joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
