"""Mapping's coordinates and group lists against a brute-force enumeration of the rank formula.

The reference walks every coordinate tuple, computes the rank from the layout formula written in
DESIGN.md / the module docstring, and groups ranks by the coordinates they share; it never calls
the code under test for the numbers it checks.
"""
import itertools

import numpy as np
import pytest

from meshserve.mapping import CpType, Mapping

# (tp, pp, cp, moe_tp, moe_ep) layouts exercised by the generic tests; None = default.
LAYOUTS = [
    (1, 1, 1, None, None),
    (4, 2, 1, None, None),
    (2, 2, 2, None, None),
    (2, 3, 2, None, None),
    (8, 1, 1, None, 2),       # split: moe_tp = 4
    (4, 2, 1, 2, None),       # split: moe_ep = 2
    (2, 1, 1, None, 4),       # seed example (a): replicate, 8 ranks
    (2, 2, 2, None, 3),       # replicate with pp and cp: 2 * 3 * 2 * 2 = 24 ranks
    (4, 1, 1, 4, 2),          # explicit replicate: 8 ranks
    (1, 2, 1, None, 4),       # pure EP, attention replicas of one rank
    (16, 1, 1, None, 4),      # seed example (b): split, 16 ranks
]


def reference(tp, pp, cp, moe_tp, moe_ep, attention_dp=False):
    """Coordinates of every rank from the rank formula, written independently of the code."""
    if moe_tp is None and moe_ep is None:
        moe_tp, moe_ep = tp, 1
    elif moe_tp is None:
        moe_tp = tp // moe_ep if tp % moe_ep == 0 else tp
    elif moe_ep is None:
        moe_ep = tp // moe_tp
    replicas = moe_tp * moe_ep // tp          # attention replicas of one TP group per slice
    slice_ranks = tp * replicas
    attn_tp = 1 if attention_dp else tp
    coords = {}
    for p, c, r, t in itertools.product(range(pp), range(cp), range(replicas), range(tp)):
        rank = ((p * cp + c) * replicas + r) * tp + t
        local = r * tp + t
        coords[rank] = dict(pp=p, cp=c, rep=r, tp=t, moe_ep=local // moe_tp,
                            moe_tp=local % moe_tp, attn_dp=local // attn_tp,
                            attn_tp=local % attn_tp)
    return coords, pp * cp * slice_ranks


# Which coordinates identify a group along each dimension (the others vary within it).
VIEWS = {
    "tp": ("tp", ("pp", "cp", "rep")),
    "pp": ("pp", ("cp", "rep", "tp")),
    "cp": ("cp", ("pp", "rep", "tp")),
    "moe_tp": ("moe_tp", ("pp", "cp", "moe_ep")),
    "moe_ep": ("moe_ep", ("pp", "cp", "moe_tp")),
    "attn_tp": ("attn_tp", ("pp", "cp", "attn_dp")),
    "attn_dp": ("attn_dp", ("pp", "cp", "attn_tp")),
}


def reference_groups(coords, dim):
    vary, fixed = VIEWS[dim]
    groups = {}
    for rank, coord in coords.items():
        groups.setdefault(tuple(coord[k] for k in fixed), []).append((coord[vary], rank))
    return [[rank for _, rank in sorted(members)] for _, members in sorted(groups.items())]


def mapping_for(layout, rank=0, **kwargs):
    tp, pp, cp, moe_tp, moe_ep = layout
    return Mapping(rank=rank, tp_size=tp, pp_size=pp, cp_size=cp, moe_tp_size=moe_tp,
                   moe_ep_size=moe_ep, **kwargs)


@pytest.mark.parametrize("attention_dp", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
@pytest.mark.parametrize("dim", list(VIEWS))
def test_group_lists_match_brute_force(layout, dim, attention_dp):
    coords, world = reference(*layout, attention_dp)
    mapping = mapping_for(layout, enable_attention_dp=attention_dp)
    assert mapping.world_size == world
    expected = reference_groups(coords, dim)
    assert getattr(mapping, f"{dim}_groups") == expected
    for rank in range(world):
        own = getattr(mapping.with_rank(rank), f"{dim}_group_ranks")
        assert own == next(g for g in expected if rank in g)


@pytest.mark.parametrize("attention_dp", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_coordinates_match_brute_force(layout, attention_dp):
    coords, world = reference(*layout, attention_dp)
    tp, pp, cp, _, _ = layout
    for rank, coord in coords.items():
        m = mapping_for(layout, rank, enable_attention_dp=attention_dp)
        got = dict(pp=m.pp_rank, cp=m.cp_rank, tp=m.tp_rank, moe_ep=m.moe_ep_rank,
                   moe_tp=m.moe_tp_rank, attn_dp=m.attn_dp_rank, attn_tp=m.attn_tp_rank)
        assert got == {k: v for k, v in coord.items() if k != "rep"}
        assert m.is_first_pp_rank == (coord["pp"] == 0)
        assert m.is_last_pp_rank == (coord["pp"] == pp - 1)
        peer = {r: c for r, c in coords.items()
                if all(c[k] == coord[k] for k in ("cp", "rep", "tp"))}
        next_pp = next(r for r, c in peer.items() if c["pp"] == (coord["pp"] + 1) % pp)
        prev_pp = next(r for r, c in peer.items() if c["pp"] == (coord["pp"] - 1) % pp)
        assert (m.next_pp_rank, m.prev_pp_rank) == (next_pp, prev_pp)
        # both the MoE and the attention views tile the same slice of ranks
        assert m.moe_tp_size * m.moe_ep_size == m.attn_tp_size * m.attn_dp_size


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_group_lists_match_numpy_moveaxis(layout):
    """DESIGN.md's recipe: reshape arange(world) and move the wanted axis last."""
    m = mapping_for(layout)
    tp, pp, cp, _, _ = layout
    grid = np.arange(m.world_size).reshape(pp, cp, m.world_size // (pp * cp * tp), tp)

    def along(axis):
        return np.moveaxis(grid, axis, -1).reshape(-1, grid.shape[axis]).tolist()

    assert (m.pp_groups, m.cp_groups, m.tp_groups) == (along(0), along(1), along(3))
    # HELIX's tp x cp groups: the (cp, tp) plane of each stage and replica, tp-major
    planes = np.moveaxis(grid, (1, 3), (-1, -2)).reshape(-1, cp * tp).tolist()
    assert m.tp_cp_groups == planes


def test_design_doc_example_tp4_pp2():
    m = Mapping(world_size=8, tp_size=4, pp_size=2)
    assert m.tp_groups == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert m.pp_groups == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert m.cp_groups == [[r] for r in range(8)]


def test_seed_moe_example_tp2_ep4_runs_on_8_ranks():
    # seed: "Total GPUs: tp_size x ep_size. For Mixtral-8x7B: 2 x 4 = 8 GPUs."
    m = Mapping(world_size=8, tp_size=2, moe_ep_size=4)
    assert Mapping(tp_size=2, moe_ep_size=4).world_size == 8
    assert (m.moe_tp_size, m.moe_ep_size) == (2, 4)
    assert (m.attn_tp_size, m.attn_dp_size) == (2, 4)
    coords, _ = reference(2, 1, 1, None, 4)
    for dim in ("tp", "moe_tp", "moe_ep", "attn_dp"):
        assert getattr(m, f"{dim}_groups") == reference_groups(coords, dim)
    # every expert-parallel group holds one rank of each attention replica
    for group in m.moe_ep_groups:
        assert sorted(r // 2 for r in group) == [0, 1, 2, 3]


def test_seed_moe_example_tp16_ep4_runs_on_16_ranks():
    # seed: --tp_size 16 --ep_size 4 on 16 ranks; TensorRT-LLM: moe_tp x moe_ep = tp
    for attention_dp in (False, True):
        m = Mapping(world_size=16, tp_size=16, moe_ep_size=4, enable_attention_dp=attention_dp)
        assert (m.moe_tp_size, m.moe_ep_size) == (4, 4)
        coords, _ = reference(16, 1, 1, None, 4, attention_dp)
        for dim in ("tp", "moe_tp", "moe_ep", "attn_tp", "attn_dp"):
            assert getattr(m, f"{dim}_groups") == reference_groups(coords, dim)
    assert m.attn_dp_groups == [list(range(16))]
    assert (m.attn_tp_size, m.attn_dp_size) == (1, 16)


def test_attention_dp_runs_over_tp_ranks_of_a_stage():
    m = Mapping(world_size=8, rank=5, tp_size=4, pp_size=2, enable_attention_dp=True)
    assert (m.attn_tp_size, m.attn_dp_size, m.attn_dp_rank) == (1, 4, 1)
    assert m.attn_dp_groups == m.tp_groups
    assert m.attn_tp_groups == [[r] for r in range(8)]


@pytest.mark.parametrize("kwargs, words", [
    (dict(tp_size=0), ["tp_size", "0"]),
    (dict(pp_size=-1), ["pp_size", "-1"]),
    (dict(cp_size=0), ["cp_size", "0"]),
    (dict(tp_size=1.5), ["tp_size", "1.5"]),
    (dict(tp_size=True), ["tp_size", "True"]),
    (dict(moe_tp_size=0), ["moe_tp_size", "0"]),
    (dict(moe_ep_size=0), ["moe_ep_size", "0"]),
    (dict(world_size=0), ["world_size", "0"]),
    (dict(world_size=6, tp_size=4), ["world_size=6", "tp_size=4", "= 4"]),
    (dict(world_size=8, tp_size=2, pp_size=2, cp_size=3), ["world_size=8", "cp_size=3", "= 12"]),
    (dict(world_size=8, tp_size=4, moe_ep_size=2), ["world_size=8", "moe_tp_size=2", "= 4"]),
    (dict(world_size=4, tp_size=4, rank=4), ["rank=4", "world_size=4", "0..3"]),
    (dict(world_size=4, tp_size=4, rank=-1), ["rank=-1", "world_size=4"]),
    (dict(tp_size=4, moe_tp_size=3, moe_ep_size=2), ["moe_tp_size=3", "moe_ep_size=2",
                                                     "= 6", "tp_size=4"]),
    (dict(tp_size=4, moe_tp_size=2, moe_ep_size=4), ["moe_tp_size=2", "moe_ep_size=4",
                                                     "= 8", "tp_size=4"]),
    (dict(tp_size=4, moe_tp_size=3), ["moe_tp_size=3", "tp_size=4"]),
    (dict(pp_size=4, num_layers=3), ["pp_size=4", "num_layers=3"]),
    (dict(pp_size=2, pp_partition=[3]), ["pp_partition=[3]", "1 entries", "pp_size=2"]),
    (dict(pp_size=2, pp_partition=[3, 0]), ["pp_partition=[3, 0]", ">= 1"]),
    (dict(pp_size=2, pp_partition=[3, 4], num_layers=8), ["sums to 7", "num_layers=8"]),
])
def test_invalid_layouts_name_the_numbers(kwargs, words):
    with pytest.raises(ValueError) as err:
        Mapping(**kwargs)
    for word in words:
        assert word in str(err.value)


def reference_even_split(num_layers, pp):
    """Deal layers out one by one, stage 0 first, then make the ranges contiguous."""
    counts = [0] * pp
    for layer in range(num_layers):
        counts[layer % pp] += 1
    ranges, start = [], 0
    for count in counts:
        ranges.append(range(start, start + count))
        start += count
    return ranges


@pytest.mark.parametrize("num_layers, pp", [(8, 2), (10, 4), (30, 4), (7, 7), (5, 1), (61, 8)])
def test_pp_layers_even_split(num_layers, pp):
    m = Mapping(pp_size=pp, num_layers=num_layers)
    assert m.pp_layers(num_layers) == reference_even_split(num_layers, pp)
    for rank in range(pp):
        assert m.with_rank(rank).this_stage_layers() == reference_even_split(num_layers, pp)[rank]


def test_pp_layers_docstring_example():
    assert Mapping(pp_size=4).pp_layers(10) == [range(0, 3), range(3, 6), range(6, 8),
                                                range(8, 10)]


def test_pp_layers_uneven_partition():
    m = Mapping(world_size=6, tp_size=2, pp_size=3, pp_partition=[2, 5, 3])
    assert m.num_layers == 10
    assert m.pp_layers(10) == [range(0, 2), range(2, 7), range(7, 10)]
    # stage of rank r is r // tp_size for this layout (pp outermost)
    for rank in range(6):
        assert m.with_rank(rank).this_stage_layers() == m.pp_layers(10)[rank // 2]
    assert Mapping(pp_size=2).pp_layers(4, pp_partition=[1, 3]) == [range(0, 1), range(1, 4)]


@pytest.mark.parametrize("num_layers, partition, words", [
    (10, [5, 4], ["sums to 9", "num_layers=10"]),
    (10, [10], ["1 entries", "pp_size=2"]),
    (10, [11, -1], [">= 1"]),
])
def test_pp_layers_rejects_bad_partition(num_layers, partition, words):
    with pytest.raises(ValueError) as err:
        Mapping(pp_size=2).pp_layers(num_layers, pp_partition=partition)
    for word in words:
        assert word in str(err.value)


def test_pp_layers_rejects_more_stages_than_layers():
    with pytest.raises(ValueError, match="pp_size=4 is larger than num_layers=3"):
        Mapping(pp_size=4).pp_layers(3)
    with pytest.raises(ValueError, match="needs num_layers"):
        Mapping(pp_size=2).this_stage_layers()


def test_cp_type_accepts_any_case():
    assert CpType.from_string("ulysses") is CpType.ULYSSES
    assert CpType.from_string("Ring") is CpType.RING
    assert CpType.from_string(CpType.STAR) is CpType.STAR
    assert CpType("HELIX") is CpType.HELIX
    assert CpType("helix") is CpType.HELIX
    with pytest.raises(ValueError, match="'spiral'.*ULYSSES, RING, STAR, HELIX"):
        CpType.from_string("spiral")


def test_mapping_module_does_not_import_torch():
    import ast
    import meshserve.mapping
    tree = ast.parse(open(meshserve.mapping.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert not imported & {"torch", "numpy"}
