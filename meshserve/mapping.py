"""Rank arithmetic: which tensor-, pipeline-, context- and expert-parallel slot each rank holds.

Pure Python, no torch: the launcher, the scheduler and `distributed/parallel_state.py` all build a
`Mapping` from the user's parallel sizes and read coordinates and group lists from it.

Layout, TP fastest: ``rank = (pp_rank * cp_size + cp_rank) * tp_size + tp_rank`` in the plain case,
so ``world_size = tp_size * pp_size * cp_size``. Group lists come from reshaping ``arange(world)``
into the layout's axes and moving the wanted axis last. 8 ranks, tp=4, pp=2::

    rank     0 1 2 3 | 4 5 6 7
    pp_rank  0 0 0 0 | 1 1 1 1
    tp_rank  0 1 2 3 | 0 1 2 3
    tp_groups [0, 1, 2, 3] [4, 5, 6, 7]      pp_groups [0, 4] [1, 5] [2, 6] [3, 7]

8 ranks, tp=2, cp=2, pp=2: tp_groups [0, 1] [2, 3] [4, 5] [6, 7]; cp_groups [0, 2] [1, 3] [4, 6]
[5, 7]; pp_groups [0, 4] [1, 5] [2, 6] [3, 7].

Experts (the MoE rule). The ranks sharing one (pp_rank, cp_rank) form a *slice* of
``num_slice_ranks`` ranks; the MoE layers tile it as ``moe_ep_size x moe_tp_size`` (moe_tp fastest)
and the attention layers as ``attn_dp_size x attn_tp_size`` (attn_tp fastest). A configuration is
valid when exactly one of these holds:

- split (TensorRT-LLM's rule): ``moe_tp_size * moe_ep_size == tp_size``. The experts split the TP
  ranks; the slice is the tp_size ranks.
- replicate ("ep beyond tp"): ``moe_tp_size == tp_size`` and ``moe_ep_size > 1``. Each expert-
  parallel slot holds a whole TP group, so the slice is ``tp_size * moe_ep_size`` ranks and
  attention runs ``moe_ep_size`` data-parallel replicas of tp_size ranks each (attn_dp_size > 1
  even without enable_attention_dp); the replica index sits between cp and tp in the layout:
  ``rank = ((pp_rank * cp_size + cp_rank) * moe_ep_size + replica) * tp_size + tp_rank``.

When moe_tp_size is not given it is ``tp_size // moe_ep_size`` if moe_ep_size divides tp_size
(split), else tp_size (replicate). When only moe_tp_size is given, moe_ep_size is
``tp_size // moe_tp_size`` (split). Any other pair, and any world_size that differs from
``num_slice_ranks * cp_size * pp_size``, is a ValueError naming the numbers. The seed's examples:

- ``tensor_parallel_size=2, moe_expert_parallel_size=4``: 4 does not divide 2, so replicate:
  moe_tp=2, 8 ranks. tp_groups = moe_tp_groups = [0, 1] [2, 3] [4, 5] [6, 7]; moe_ep_groups =
  attn_dp_groups = [0, 2, 4, 6] [1, 3, 5, 7] (4 attention replicas of TP 2).
- ``--tp_size 16 --ep_size 4``: 4 divides 16, so split: moe_tp=4, 16 ranks. moe_tp_groups
  [0..3] [4..7] [8..11] [12..15]; moe_ep_groups [0, 4, 8, 12] [1, 5, 9, 13] ... [3, 7, 11, 15].

With enable_attention_dp, attention runs data-parallel over the whole slice (attn_tp_size=1,
attn_dp_size=num_slice_ranks, i.e. tp_size in the split case): each rank owns its requests and KV,
while dense and MoE weights stay TP/EP as above. MoE groups never cross cp or pp.
"""
from __future__ import annotations

import enum
import itertools
from math import prod

__all__ = ["CpType", "Mapping"]


class CpType(enum.Enum):
    """How the sequence is split over the cp ranks (see DESIGN.md, "Parallelism")."""

    ULYSSES = "ulysses"
    RING = "ring"
    STAR = "star"
    HELIX = "helix"

    @classmethod
    def from_string(cls, value: "str | CpType") -> "CpType":
        """Accept a CpType or its name in any case ("ulysses", "Ring", "STAR")."""
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            for member in cls:
                if member.name == value.strip().upper():
                    return member
        accepted = ", ".join(m.name for m in cls)
        raise ValueError(f"unknown cp_type {value!r}; accepted (any case): {accepted}")

    @classmethod
    def _missing_(cls, value: object) -> "CpType | None":
        # lets CpType("ULYSSES") / CpType("Ring") work like from_string
        if isinstance(value, str):
            for member in cls:
                if member.name == value.strip().upper():
                    return member
        return None


def _check_size(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _axis_groups(shape: tuple[int, ...], axis: int) -> list[list[int]]:
    """Groups of `arange(prod(shape)).reshape(shape)` along `axis`.

    Same as numpy's ``moveaxis(arange(n).reshape(shape), axis, -1).reshape(-1, shape[axis])``:
    one group per coordinate of the other axes, in row-major order.
    """
    strides = [prod(shape[i + 1:]) for i in range(len(shape))]
    others = [i for i in range(len(shape)) if i != axis]
    groups = []
    for coord in itertools.product(*(range(shape[i]) for i in others)):
        base = sum(c * strides[i] for c, i in zip(coord, others))
        groups.append([base + k * strides[axis] for k in range(shape[axis])])
    return groups


# Mapping's names are the seed's; LLM(...), the YAML and the serve flags spell them differently
_LLM_NAMES = ("; in LLM(...) and the YAML: tensor_parallel_size, moe_tensor_parallel_size, moe_expert_parallel_size; "
              "serve flags: --tp_size, --moe_tp_size, --ep_size")


def _resolve_moe(tp_size: int, moe_tp_size: int | None, moe_ep_size: int | None) -> tuple[int, int]:
    """Apply the MoE rule from the module docstring; return (moe_tp_size, moe_ep_size)."""
    if moe_tp_size is not None:
        _check_size("moe_tp_size", moe_tp_size)
    if moe_ep_size is not None:
        _check_size("moe_ep_size", moe_ep_size)
    if moe_tp_size is None and moe_ep_size is None:
        return tp_size, 1
    if moe_tp_size is None:
        if tp_size % moe_ep_size == 0:
            return tp_size // moe_ep_size, moe_ep_size
        return tp_size, moe_ep_size
    if moe_ep_size is None:
        if tp_size % moe_tp_size != 0:
            raise ValueError(
                f"moe_tp_size={moe_tp_size} must divide tp_size={tp_size} when moe_ep_size is not "
                f"given (moe_ep_size = tp_size / moe_tp_size){_LLM_NAMES}")
        return moe_tp_size, tp_size // moe_tp_size
    if moe_tp_size * moe_ep_size != tp_size and moe_tp_size != tp_size:
        raise ValueError(
            f"moe_tp_size={moe_tp_size} x moe_ep_size={moe_ep_size} = {moe_tp_size * moe_ep_size} "
            f"does not fit tp_size={tp_size}: accepted are moe_tp_size x moe_ep_size == tp_size "
            f"(experts split the TP ranks) or moe_tp_size == tp_size (each EP slot holds a whole "
            f"TP group, tp_size x moe_ep_size ranks per slice){_LLM_NAMES}")
    return moe_tp_size, moe_ep_size


class Mapping:
    """One rank's place in the tp x pp x cp (x moe) layout; see the module docstring for the rules.

    Args:
        world_size: total ranks; defaults to num_slice_ranks * cp_size * pp_size and must equal it.
        rank: this process's global rank, 0 <= rank < world_size.
        tp_size, pp_size, cp_size: tensor-, pipeline- and context-parallel degrees.
        moe_tp_size, moe_ep_size: expert layers' TP and EP degrees (module docstring: MoE rule).
        enable_attention_dp: attention data-parallel over the slice (attn_tp_size = 1).
        pp_partition: layers per pipeline stage, for uneven splits; sums to num_layers.
        num_layers: decoder layers of the model; when given, checked against pp_size and
            pp_partition (defaults to sum(pp_partition) when only pp_partition is given).
    """

    def __init__(self, world_size: int | None = None, rank: int = 0, tp_size: int = 1,
                 pp_size: int = 1, cp_size: int = 1, moe_tp_size: int | None = None,
                 moe_ep_size: int | None = None, enable_attention_dp: bool = False,
                 pp_partition: list[int] | None = None, num_layers: int | None = None):
        self.tp_size = _check_size("tp_size", tp_size)
        self.pp_size = _check_size("pp_size", pp_size)
        self.cp_size = _check_size("cp_size", cp_size)
        self.moe_tp_size, self.moe_ep_size = _resolve_moe(tp_size, moe_tp_size, moe_ep_size)
        self.enable_attention_dp = bool(enable_attention_dp)
        # tp_size in the split case, tp_size * moe_ep_size in the replicate case
        self.num_slice_ranks = self.moe_tp_size * self.moe_ep_size

        expected_world = self.num_slice_ranks * self.cp_size * self.pp_size
        if world_size is None:
            world_size = expected_world
        _check_size("world_size", world_size)
        if world_size != expected_world:
            raise ValueError(
                f"world_size={world_size} does not match the layout: {self.num_slice_ranks} ranks "
                f"per slice (tp_size={self.tp_size}, moe_tp_size={self.moe_tp_size}, "
                f"moe_ep_size={self.moe_ep_size}) x cp_size={self.cp_size} x "
                f"pp_size={self.pp_size} = {expected_world}")
        self.world_size = world_size
        if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"rank={rank!r} is out of range for world_size={world_size} "
                             f"(accepted: 0..{world_size - 1})")
        self.rank = rank

        if num_layers is not None:
            _check_size("num_layers", num_layers)
            if self.pp_size > num_layers:
                raise ValueError(f"pp_size={self.pp_size} is larger than num_layers={num_layers}: "
                                 f"every pipeline stage needs at least one layer")
        if pp_partition is not None:
            pp_partition = list(pp_partition)
            self._check_partition(pp_partition, num_layers)
            num_layers = sum(pp_partition)
        self.num_layers = num_layers
        self.pp_partition = pp_partition

    # ---- coordinates -------------------------------------------------------------------------
    @property
    def _local(self) -> int:
        return self.rank % self.num_slice_ranks

    @property
    def tp_rank(self) -> int:
        return self._local % self.tp_size

    @property
    def cp_rank(self) -> int:
        return self.rank // self.num_slice_ranks % self.cp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // (self.num_slice_ranks * self.cp_size)

    @property
    def moe_tp_rank(self) -> int:
        return self._local % self.moe_tp_size

    @property
    def moe_ep_rank(self) -> int:
        return self._local // self.moe_tp_size

    @property
    def attn_tp_size(self) -> int:
        return 1 if self.enable_attention_dp else self.tp_size

    @property
    def attn_dp_size(self) -> int:
        return self.num_slice_ranks // self.attn_tp_size

    @property
    def attn_tp_rank(self) -> int:
        return self._local % self.attn_tp_size

    @property
    def attn_dp_rank(self) -> int:
        return self._local // self.attn_tp_size

    @property
    def is_first_pp_rank(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp_rank(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def prev_pp_rank(self) -> int:
        """Global rank of the previous stage's peer (wraps around from the first stage)."""
        stride = self.num_slice_ranks * self.cp_size
        return (self.rank - stride) % self.world_size

    @property
    def next_pp_rank(self) -> int:
        """Global rank of the next stage's peer (wraps around from the last stage)."""
        stride = self.num_slice_ranks * self.cp_size
        return (self.rank + stride) % self.world_size

    # ---- group lists ---------------------------------------------------------------------------
    # Two views of the same arange(world): attention/dense [pp, cp, replicas, tp] and
    # MoE [pp, cp, moe_ep, moe_tp]; a group list moves one axis last.
    def _dense_shape(self) -> tuple[int, int, int, int]:
        return (self.pp_size, self.cp_size, self.num_slice_ranks // self.tp_size, self.tp_size)

    @property
    def tp_groups(self) -> list[list[int]]:
        return _axis_groups(self._dense_shape(), 3)

    @property
    def pp_groups(self) -> list[list[int]]:
        return _axis_groups(self._dense_shape(), 0)

    @property
    def cp_groups(self) -> list[list[int]]:
        return _axis_groups(self._dense_shape(), 1)

    @property
    def tp_cp_groups(self) -> list[list[int]]:
        """Context parallelism HELIX: the tp x cp ranks of one stage (and replica) as one tensor-
        parallel group after attention, ordered tp-major ((tp 0, cp 0), (tp 0, cp 1), ...) so that
        a member's position is the head slice it holds (the tp rank's heads split over cp)."""
        pp, cp, reps, tp = self._dense_shape()
        groups = []
        for p in range(pp):
            for r in range(reps):
                groups.append([((p * cp + c) * reps + r) * tp + t for t in range(tp) for c in range(cp)])
        return groups

    @property
    def moe_tp_groups(self) -> list[list[int]]:
        return _axis_groups((self.pp_size, self.cp_size, self.moe_ep_size, self.moe_tp_size), 3)

    @property
    def moe_ep_groups(self) -> list[list[int]]:
        return _axis_groups((self.pp_size, self.cp_size, self.moe_ep_size, self.moe_tp_size), 2)

    @property
    def attn_tp_groups(self) -> list[list[int]]:
        return _axis_groups((self.pp_size, self.cp_size, self.attn_dp_size, self.attn_tp_size), 3)

    @property
    def attn_dp_groups(self) -> list[list[int]]:
        """Ranks holding the same attention shard in different data-parallel replicas."""
        return _axis_groups((self.pp_size, self.cp_size, self.attn_dp_size, self.attn_tp_size), 2)

    def _own(self, groups: list[list[int]]) -> list[int]:
        return next(g for g in groups if self.rank in g)

    @property
    def tp_group_ranks(self) -> list[int]:
        return self._own(self.tp_groups)

    @property
    def pp_group_ranks(self) -> list[int]:
        return self._own(self.pp_groups)

    @property
    def cp_group_ranks(self) -> list[int]:
        return self._own(self.cp_groups)

    @property
    def moe_tp_group_ranks(self) -> list[int]:
        return self._own(self.moe_tp_groups)

    @property
    def moe_ep_group_ranks(self) -> list[int]:
        return self._own(self.moe_ep_groups)

    @property
    def attn_tp_group_ranks(self) -> list[int]:
        return self._own(self.attn_tp_groups)

    @property
    def attn_dp_group_ranks(self) -> list[int]:
        return self._own(self.attn_dp_groups)

    # ---- pipeline layers -----------------------------------------------------------------------
    def _check_partition(self, pp_partition: list[int], num_layers: int | None) -> None:
        if len(pp_partition) != self.pp_size:
            raise ValueError(f"pp_partition={pp_partition} has {len(pp_partition)} entries, "
                             f"expected pp_size={self.pp_size}")
        if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in pp_partition):
            raise ValueError(f"pp_partition={pp_partition} must hold integers >= 1 "
                             f"(every stage needs at least one layer)")
        if num_layers is not None and sum(pp_partition) != num_layers:
            raise ValueError(f"pp_partition={pp_partition} sums to {sum(pp_partition)}, "
                             f"expected num_layers={num_layers}")

    def pp_layers(self, num_layers: int, pp_partition: list[int] | None = None) -> list[range]:
        """Contiguous layer ranges, one per pipeline stage.

        With no partition (argument, else the one given to the constructor) the split is even
        and the first ``num_layers % pp_size`` stages take one extra layer, so the last stage,
        which also holds the final norm and LM head, is never the largest. 10 layers over 4
        stages: range(0, 3), range(3, 6), range(6, 8), range(8, 10).
        """
        _check_size("num_layers", num_layers)
        if self.pp_size > num_layers:
            raise ValueError(f"pp_size={self.pp_size} is larger than num_layers={num_layers}: "
                             f"every pipeline stage needs at least one layer")
        if pp_partition is None:
            pp_partition = self.pp_partition
        if pp_partition is None:
            base, extra = divmod(num_layers, self.pp_size)
            pp_partition = [base + (1 if stage < extra else 0) for stage in range(self.pp_size)]
        else:
            pp_partition = list(pp_partition)
            self._check_partition(pp_partition, num_layers)
        starts = [0, *itertools.accumulate(pp_partition)]
        return [range(starts[i], starts[i + 1]) for i in range(self.pp_size)]

    def this_stage_layers(self, num_layers: int | None = None) -> range:
        """This rank's layer range; num_layers defaults to the constructor's."""
        if num_layers is None:
            num_layers = self.num_layers
        if num_layers is None:
            raise ValueError("this_stage_layers needs num_layers: pass it here or to Mapping(...)")
        return self.pp_layers(num_layers)[self.pp_rank]

    # ---- misc ----------------------------------------------------------------------------------
    def with_rank(self, rank: int) -> "Mapping":
        """The same layout seen from another rank (the launcher builds one per process)."""
        return Mapping(self.world_size, rank, self.tp_size, self.pp_size, self.cp_size,
                       self.moe_tp_size, self.moe_ep_size, self.enable_attention_dp,
                       self.pp_partition, self.num_layers)

    def _key(self) -> tuple:
        return (self.world_size, self.rank, self.tp_size, self.pp_size, self.cp_size,
                self.moe_tp_size, self.moe_ep_size, self.enable_attention_dp,
                None if self.pp_partition is None else tuple(self.pp_partition), self.num_layers)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Mapping) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (f"Mapping(world_size={self.world_size}, rank={self.rank}, tp_size={self.tp_size}, "
                f"pp_size={self.pp_size}, cp_size={self.cp_size}, "
                f"moe_tp_size={self.moe_tp_size}, moe_ep_size={self.moe_ep_size}, "
                f"enable_attention_dp={self.enable_attention_dp}, "
                f"pp_partition={self.pp_partition}, num_layers={self.num_layers})")
