"""ParallelState on 4 CPU processes (gloo): collectives reach exactly the ranks of each group.

One spawn runs every rank's checks and writes what each collective returned to a JSON file; the
tests compare those results with values computed here from the rank formula
rank = (pp_rank * cp_size + cp_rank) * tp_size + tp_rank, not from Mapping's own group lists.
"""
import json
import os

import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from meshserve.distributed.parallel_state import (  # noqa: E402
    ParallelState, destroy_distributed, init_distributed)
from meshserve.mapping import Mapping  # noqa: E402

from helpers import free_port  # noqa: E402

WORLD, TP, PP = 4, 2, 2

pytestmark = pytest.mark.timeout(120)


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    init_distributed(rank, WORLD, "127.0.0.1", port, "gloo", timeout_s=60)
    state = ParallelState(Mapping(WORLD, rank, tp_size=TP, pp_size=PP), timeout_s=60)
    res = {"tp_ranks": state.tp.ranks, "pp_ranks": state.pp.ranks}
    mine = torch.tensor([2.0 ** rank], dtype=torch.float64)  # group sums identify the members
    for name in ("world", "tp", "pp", "cp", "moe_tp", "moe_ep", "attn_tp", "attn_dp"):
        res[f"sum_{name}"] = getattr(state, name).all_reduce(mine.clone()).item()
    row = torch.tensor([[rank, 10 * rank]], dtype=torch.int64)  # [1, 2]
    res["gather_tp_dim0"] = state.tp.all_gather(row, dim=0).tolist()
    res["gather_tp_dim1"] = state.tp.all_gather(row, dim=-1).tolist()
    res["gather_world_dim0"] = state.world.all_gather(row, dim=0).tolist()
    res["gather_cp"] = state.cp.all_gather(row, dim=0).tolist()
    res["bcast_tp"] = state.tp.broadcast(torch.tensor([rank]), src=1).item()
    # reduce_scatter: every rank contributes rows rank*[1..4]; member i keeps the summed rows of its slice
    contrib = torch.arange(1, 5, dtype=torch.float64)[:, None].repeat(1, 2) * (rank + 1)  # [4, 2]
    res["rs_world_dim0"] = state.world.reduce_scatter(contrib, dim=0).tolist()
    res["rs_tp_dim1"] = state.tp.reduce_scatter(contrib.t().contiguous(), dim=1).tolist()
    # all_to_all with uneven splits: we send (j + 1) rows to member j, each row [rank, j, k]
    send = torch.tensor([[rank, j, k] for j in range(WORLD) for k in range(j + 1)], dtype=torch.int64)
    recv_sizes = [rank + 1] * WORLD  # every member sends us rank + 1 rows
    res["a2a_world"] = state.world.all_to_all(send, recv_sizes, [j + 1 for j in range(WORLD)]).tolist()
    res["a2a_tp_even"] = state.tp.all_to_all(torch.tensor([[rank * 10 + i] for i in range(TP)])).tolist()
    payload = torch.arange(3, dtype=torch.float32) + 100 * rank
    if state.pp.is_first_rank:
        state.pp.send(payload, dst=state.pp.next_rank)
        res["pp_recv"] = None
    else:
        res["pp_recv"] = state.pp.recv(torch.empty(3), src=state.pp.prev_rank).tolist()
    state.tp.barrier()
    state.world.barrier()

    # A second layout on the same 4 ranks: replicate MoE (moe_tp = tp = 2, moe_ep = 2).
    moe_state = ParallelState(Mapping(WORLD, rank, tp_size=2, moe_tp_size=2, moe_ep_size=2))
    res["sum_moe_ep_replicate"] = moe_state.moe_ep.all_reduce(mine.clone()).item()
    res["sum_attn_dp_replicate"] = moe_state.attn_dp.all_reduce(mine.clone()).item()
    moe_state.destroy()
    state.destroy()
    dist.barrier()
    destroy_distributed()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("parallel_state")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return {r: json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)}


def coords(rank):
    """(pp_rank, tp_rank) of a rank from the layout formula with cp_size = 1."""
    return divmod(rank, TP)


def members(rank, same):
    """Ranks sharing the coordinates named in `same` with `rank`, in order of the other one."""
    p, t = coords(rank)
    return [r for r in range(WORLD)
            if ("pp" not in same or coords(r)[0] == p) and ("tp" not in same or coords(r)[1] == t)]


def power_sum(ranks):
    return float(sum(2 ** r for r in ranks))


def test_groups_hold_the_ranks_the_formula_gives(results):
    for rank, res in results.items():
        assert res["tp_ranks"] == members(rank, {"pp"})
        assert res["pp_ranks"] == members(rank, {"tp"})


def test_all_reduce_sums_exactly_the_group_members(results):
    for rank, res in results.items():
        tp_group, pp_group = members(rank, {"pp"}), members(rank, {"tp"})
        assert res["sum_world"] == power_sum(range(WORLD))
        assert res["sum_tp"] == power_sum(tp_group)
        assert res["sum_pp"] == power_sum(pp_group)
        assert res["sum_cp"] == power_sum([rank])            # cp_size = 1: identity
        assert res["sum_moe_tp"] == power_sum(tp_group)      # no EP: MoE TP is the TP group
        assert res["sum_moe_ep"] == power_sum([rank])
        assert res["sum_attn_tp"] == power_sum(tp_group)
        assert res["sum_attn_dp"] == power_sum([rank])


def test_all_gather_concatenates_in_group_order(results):
    for rank, res in results.items():
        tp_group = members(rank, {"pp"})
        assert res["gather_tp_dim0"] == [[r, 10 * r] for r in tp_group]
        assert res["gather_tp_dim1"] == [[v for r in tp_group for v in (r, 10 * r)]]
        assert res["gather_world_dim0"] == [[r, 10 * r] for r in range(WORLD)]
        assert res["gather_cp"] == [[rank, 10 * rank]]


def test_broadcast_copies_the_source_members_value(results):
    for rank, res in results.items():
        assert res["bcast_tp"] == members(rank, {"pp"})[1]


def test_pp_send_recv_moves_the_previous_stages_tensor(results):
    for rank, res in results.items():
        p, t = coords(rank)
        if p == 0:
            assert res["pp_recv"] is None
        else:
            sender = (p - 1) * TP + t
            assert res["pp_recv"] == [100.0 * sender + i for i in range(3)]


def test_replicate_moe_groups_span_the_attention_replicas(results):
    # tp=2, moe_ep=2 with moe_tp=2: replicas r // 2; an EP group takes one rank per replica
    for rank, res in results.items():
        ep_group = [r for r in range(WORLD) if r % 2 == rank % 2]
        assert res["sum_moe_ep_replicate"] == power_sum(ep_group)
        assert res["sum_attn_dp_replicate"] == power_sum(ep_group)


def test_reduce_scatter_sums_then_keeps_this_members_slice(results):
    total = sum(r + 1 for r in range(WORLD))  # the contributions' common factor, summed
    for rank, res in results.items():
        # world group: 4 rows over 4 members, one row each; row i of the sum is (i + 1) * total
        assert res["rs_world_dim0"] == [[float((rank + 1) * total)] * 2]
        tp_members = members(rank, "pp")
        tp_total = sum(m + 1 for m in tp_members)
        tp_rank = coords(rank)[1]
        # [2, 4] split on dim 1 over 2 members: columns 2*tp_rank, 2*tp_rank + 1
        cols = [float((c + 1) * tp_total) for c in (2 * tp_rank, 2 * tp_rank + 1)]
        assert res["rs_tp_dim1"] == [cols, cols]


def test_all_to_all_routes_uneven_splits_by_member(results):
    for rank, res in results.items():
        # from each member src, in member order, the rank + 1 rows src addressed to us
        assert res["a2a_world"] == [[src, rank, k] for src in range(WORLD) for k in range(rank + 1)]
        tp_members = members(rank, "pp")
        tp_rank = coords(rank)[1]
        assert res["a2a_tp_even"] == [[m * 10 + tp_rank] for m in tp_members]
