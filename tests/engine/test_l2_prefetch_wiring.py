"""The L2 prefetch hints (kernels/prefetch.py) as the models wire them and the layers ask for them:
kernel_config.decode_l2_prefetch (attention -> its o_proj) and kernel_config.l2_prefetch_next_layer
(an MoE router gate -> the next layer's q/k/v). The prefetch instruction runs only on a GPU
(tests/gpu/test_l2_prefetch.py); here: which weight each layer names, that naming one registers no
module or parameter (checkpoints load as before), when a linear asks, and that the switches are
accepted and leave greedy ids equal to transformers'."""
import pytest
import torch

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams, kernels

SP = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("qwen3-moe-prefetch"))
    hf = build_checkpoint(path, "qwen3_moe", num_hidden_layers=3)
    prompts = make_prompts(3, 300, 20, seed=11)
    return path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts], set(hf.state_dict())


def test_layers_name_the_weights_to_prefetch(moe):
    path, prompts, ref, hf_keys = moe
    with LLM(path, show_progress=False, dtype="float32",
             kernel_config={"decode_l2_prefetch": True, "l2_prefetch_next_layer": True}) as llm:
        runner = llm._core.executor.runner
        assert runner.kernel_settings.decode_l2_prefetch and runner.kernel_settings.l2_prefetch_next_layer
        model = runner.model
        layers = model.model.layers
        for i, layer in enumerate(layers):
            assert layer.self_attn.attn.prefetch_after[0] is layer.self_attn.o_proj
            gate = layer.mlp.gate
            if i + 1 < len(layers):
                assert gate.prefetch_after[0] is layers[i + 1].self_attn.qkv_proj
            else:  # the last layer has no next layer on this stage
                assert gate.prefetch_after is None
        names = [n for n, _ in model.named_modules()] + list(model.state_dict())
        assert not any("prefetch_after" in n for n in names)
        assert len(list(model.parameters())) == len({id(p) for p in model.parameters()})
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert got == ref


class _Row:
    """Stands in for a one-row CUDA input (what LinearBase.l2_prefetch reads: is_cuda, shape)."""

    def __init__(self, rows: int, cuda: bool = True):
        self.shape, self.is_cuda = (rows, 16), cuda


def test_a_linear_asks_only_for_one_row_on_a_gpu_with_the_switch(monkeypatch):
    from meshserve.layers.linear import ReplicatedLinear

    gate, nxt = ReplicatedLinear(16, 4), ReplicatedLinear(16, 48)
    gate.weight.data.copy_(torch.randn(4, 16))  # (a new layer's weight is uninitialised memory)
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", True)
    assert gate.l2_prefetch(_Row(1)) is None  # nothing named
    gate.prefetch_after = (nxt,)
    assert gate.l2_prefetch(_Row(1)) is nxt.weight
    assert gate.l2_prefetch(_Row(2)) is None and gate.l2_prefetch(_Row(1, cuda=False)) is None
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", False)
    assert gate.l2_prefetch(_Row(1)) is None
    # the CPU path runs the linear as before, the hint aside
    x = torch.randn(1, 16)
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", True)
    torch.testing.assert_close(gate(x), x @ gate.weight.T)


def test_experts_stream_evict_first_only_in_one_row_steps_with_the_switch(monkeypatch):
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", True)
    assert kernels.expert_eviction(1) == "evict_first"
    assert kernels.expert_eviction(2) == "" and kernels.expert_eviction(64) == ""
    monkeypatch.setattr(kernels, "L2_PREFETCH_NEXT_LAYER", False)
    assert kernels.expert_eviction(1) == ""


def test_configure_sets_the_switch():
    from meshserve.kernels import settings as ks
    import dataclasses

    try:
        kernels.configure(dataclasses.replace(ks.H200, l2_prefetch_next_layer=True))
        assert kernels.L2_PREFETCH_NEXT_LAYER is True
    finally:
        kernels.configure(ks.H200)
    assert kernels.L2_PREFETCH_NEXT_LAYER is False


def test_unknown_prefetch_field_is_refused():
    with pytest.raises(ValueError, match="l2_prefetch"):
        LLM("/nonexistent", kernel_config={"l2_prefetch": True})
