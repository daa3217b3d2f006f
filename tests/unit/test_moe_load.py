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


def test_sharded_checkpoint_files_without_wanted_tensors_are_not_opened(tmp_path, monkeypatch):
    """iter_safetensors with a shard filter opens only the files (by the index's weight_map) that hold
    a wanted tensor, and yields exactly the wanted tensors, bitwise, from the others."""
    import json

    from safetensors.torch import save_file

    from meshserve.models import loader
    g = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(3, 2, generator=g) for i in range(4)}
    tensors["model.embed_tokens.weight"] = torch.randn(5, 2, generator=g)
    weight_map = {}
    for i in range(4):  # one file per layer, the embedding beside layer 0
        names = [n for n in tensors if f".layers.{i}." in n] + (["model.embed_tokens.weight"] if i == 0 else [])
        file = f"model-{i + 1:05d}-of-00004.safetensors"
        save_file({n: tensors[n] for n in names}, str(tmp_path / file))
        weight_map.update(dict.fromkeys(names, file))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    opened = []
    real = loader.safe_open
    monkeypatch.setattr(loader, "safe_open", lambda f, **kw: opened.append(f.rsplit("/", 1)[-1]) or real(f, **kw))

    def wanted(name):
        return ".layers.2." in name or ".layers.3." in name
    got = dict(loader.iter_safetensors(str(tmp_path), show_progress=False, wanted=wanted))
    assert sorted(opened) == ["model-00003-of-00004.safetensors", "model-00004-of-00004.safetensors"]
    assert sorted(got) == sorted(n for n in tensors if wanted(n))
    assert all(torch.equal(got[n], tensors[n]) for n in got)
    opened.clear()
    assert sorted(dict(loader.iter_safetensors(str(tmp_path), show_progress=False))) == sorted(tensors)
    assert len(opened) == 4  # no filter: every file
