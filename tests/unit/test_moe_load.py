"""ExpertLoad (layers/moe/load.py): the per-step window against counts done in plain Python."""
import random

import torch

from meshserve.layers.moe.load import ExpertLoad


def _reference(steps, num_experts):
    """steps: per step, per layer, the list of expert ids routed (real rows only)."""
    totals = [[0] * num_experts for _ in steps[0]]
    ratios, hits = [], []
    for step in steps:
        r, h = [], []
        for li, ids in enumerate(step):
            c = [0] * num_experts
            for e in ids:
                c[e] += 1
                totals[li][e] += 1
            mean = sum(c) / num_experts
            r.append(max(c) / max(mean, 1e-9))
            h.append(sum(1 for x in c if x))
        ratios.append(sum(r) / len(r))
        hits.append(sum(h) / len(h))
    return totals, sum(ratios) / len(ratios), max(ratios), sum(hits) / len(hits)


def test_window_counts_ratios_and_padding_rows():
    rng = random.Random(0)
    layers, E, k, every, max_tokens = [1, 3], 8, 2, 4, 5
    load = ExpertLoad(layers, E, k, torch.device("cpu"), every=every)
    load.reserve(max_tokens)
    steps, reports = [], []
    for _ in range(every + 2):  # one full window (reported at once on CPU) and a partial one
        n = rng.randint(1, max_tokens - 1)
        load.ids.fill_(E - 1)  # padding rows beyond n must not be counted
        step = []
        for layer in layers:
            ids = [rng.sample(range(E), k) for _ in range(n)]
            load.ids_out(layer, n).copy_(torch.tensor(ids))
            step.append([e for row in ids for e in row])
        steps.append(step)
        rep = load.end_step(n)
        if rep is not None:
            reports.append(rep)
    reports += load.flush()
    assert [r["steps"] for r in reports] == [every, 2]
    for rep, chunk in zip(reports, (steps[:every], steps[every:])):
        totals, rmean, rmax, hit = _reference(chunk, E)
        assert rep["layers"] == layers and rep["tokens"] == totals
        assert abs(rep["ratio_mean"] - rmean) < 1e-12 and abs(rep["ratio_max"] - rmax) < 1e-12
        assert abs(rep["experts_hit_mean"] - hit) < 1e-12
    assert load.flush() == []  # nothing left


def test_shard_filter_reads_only_this_shards_layers_and_experts():
    """A pipeline stage reads its own layers; an expert-parallel rank its own experts' tensors (the
    fused transformers-5 expert tensors, other tensors and multi-token-prediction layers always)."""
    from types import SimpleNamespace

    from meshserve.layers.moe.dispatch import ExpertPlacement
    from meshserve.models.loader import shard_filter
    blocks = {i: SimpleNamespace(experts=SimpleNamespace(placement=ExpertPlacement(8, 4, 1))) for i in (2, 3)}
    model = SimpleNamespace(model=SimpleNamespace(layer_range=range(2, 4)), cfg=SimpleNamespace(num_hidden_layers=4),
                            moe_blocks=lambda: blocks)
    wanted = shard_filter(model)
    assert wanted("model.embed_tokens.weight") and wanted("lm_head.weight") and wanted("model.norm.weight")
    assert not wanted("model.layers.1.self_attn.q_proj.weight")  # another stage's layer
    assert wanted("model.layers.2.self_attn.q_proj.weight")
    assert wanted("model.layers.4.mlp.experts.0.gate_proj.weight")  # MTP layer: the model counts and skips it
    owned = [e for e in range(8) if wanted(f"model.layers.3.mlp.experts.{e}.up_proj.weight")]
    assert owned == [2, 3]
    assert wanted("model.layers.3.block_sparse_moe.experts.3.w1.weight")
    assert not wanted("model.layers.3.block_sparse_moe.experts.5.w1.weight")
    assert not wanted("model.layers.2.mlp.experts.0.down_proj.weight_scale_inv")
    assert wanted("model.layers.2.mlp.experts.gate_up_proj")  # fused: every expert in one tensor
    assert wanted("model.layers.2.mlp.experts.9.gate_proj.weight")  # no such expert: the model says so
    assert wanted("model.layers.2.mlp.shared_expert.gate_proj.weight")
