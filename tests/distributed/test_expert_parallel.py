"""Expert parallelism on CPU ranks (gloo): greedy ids of tiny Mixtral, Qwen2-MoE and Qwen3-MoE equal
transformers at tp2 x ep2 and tp4 x ep2 (the split rule: experts split the TP ranks) and at the
seed's tp2 x ep4 on 8 ranks (the replicate rule: 4 attention replicas of TP 2); the all-to-all
dispatch against the plain computation on random tensors; expert load reported from every rank
layout; `meshserve serve --tp_size 2 --ep_size 2` with the expert counters in /metrics; invalid
layouts are errors naming the numbers."""
import os
import subprocess
import sys
import textwrap
import time

import httpx
import pytest
from openai import OpenAI

from helpers import build_checkpoint, hf_greedy, make_prompts
from meshserve import LLM, SamplingParams

SP = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
KV = {"tokens_per_block": 4, "max_tokens": 2048}
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe"]
LAYOUTS = {"tp2xep2": (2, 2, 2), "tp4xep2": (4, 2, 4), "tp2xep4": (2, 4, 8)}  # tp, ep, world size


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for arch in ARCHS:
        path = str(tmp_path_factory.mktemp(arch))
        hf = build_checkpoint(path, arch)
        prompts = make_prompts(5, 320, 13, seed=3)
        out[arch] = (path, prompts, [hf_greedy(hf, p, SP.max_tokens) for p in prompts])
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("arch", ARCHS)
def test_ep_matches_transformers(checkpoints, arch, layout):
    path, prompts, ref = checkpoints[arch]
    tp, ep, world = LAYOUTS[layout]
    with LLM(path, tensor_parallel_size=tp, moe_expert_parallel_size=ep, kv_cache_config=KV,
             show_progress=False) as llm:
        assert llm._core.executor.world_size == world
        got = [o.outputs[0].token_ids for o in llm.generate(prompts, SP, use_tqdm=False)]
    assert got == ref, f"{arch} {layout}"


def test_ep_with_explicit_moe_tp_and_yaml(tmp_path, checkpoints):
    """moe_tensor_parallel_size given with ep (split: 2 x 2 = tp 4), and the sizes from a YAML file."""
    path, prompts, ref = checkpoints["qwen3_moe"]
    cfg = tmp_path / "cfg.yml"
    cfg.write_text("tensor_parallel_size: 4\nmoe_expert_parallel_size: 2\nmoe_tensor_parallel_size: 2\n"
                   "kv_cache_config:\n  tokens_per_block: 4\n  max_tokens: 2048\n")
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json
        from meshserve import LLM, SamplingParams
        from meshserve.config import load_yaml_config  # what `meshserve serve --config` reads
        if __name__ == "__main__":
            args = load_yaml_config({str(cfg)!r})
            with LLM({path!r}, show_progress=False, **args) as llm:
                outs = llm.generate({prompts!r}, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                                    use_tqdm=False)
                print("IDS", json.dumps([o.outputs[0].token_ids for o in outs]))
                print("LOAD", json.dumps(llm.get_stats()["expert_tokens"]))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-3000:]
    ids = [line for line in out.stdout.splitlines() if line.startswith("IDS ")][0][4:]
    import json
    assert json.loads(ids) == ref


def test_all_to_all_dispatch_matches_dense_computation(tmp_path):
    """EpDispatcher on 4 gloo ranks (moe_tp 2 x moe_ep 2) against every expert computed on one rank in
    float64, with a token count that does not split evenly over the EP ranks."""
    script = tmp_path / "dispatch.py"
    script.write_text(textwrap.dedent("""
        import os, sys, torch
        import torch.multiprocessing as mp
        from meshserve.distributed.parallel_state import ParallelState, init_distributed
        from meshserve.mapping import Mapping
        from meshserve.layers.moe.layer import FusedMoE
        from meshserve.layers.moe.router import RouterConfig

        E, H, I, K, T = 8, 16, 12, 3, 7
        def full():
            g = torch.Generator().manual_seed(1)
            return (torch.randn(T, H, generator=g), torch.randn(T, E, generator=g),
                    torch.randn(E, 2 * I, H, generator=g) * 0.3, torch.randn(E, H, I, generator=g) * 0.3)

        def reference():
            x, logits, w13, w2 = (t.double() for t in full())
            p = torch.softmax(logits, -1); w, ids = p.topk(K, -1); w = w / w.sum(-1, keepdim=True)
            out = torch.zeros(T, H, dtype=torch.float64)
            for t in range(T):
                for k in range(K):
                    e = ids[t, k]
                    h = w13[e] @ x[t]
                    out[t] += w[t, k] * (w2[e] @ (torch.nn.functional.silu(h[:I]) * h[I:]))
            return out

        def rank_main(rank, port):
            init_distributed(rank, 4, "127.0.0.1", port, "gloo")
            state = ParallelState(Mapping(4, rank, tp_size=4, moe_tp_size=2, moe_ep_size=2))
            x, logits, w13, w2 = full()
            moe = FusedMoE(E, H, I, RouterConfig(K), state, torch.float32, "VANILLA")
            for e in range(E):
                moe.load_weight(f"experts.{e}.gate_proj.weight", w13[e, :I])
                moe.load_weight(f"experts.{e}.up_proj.weight", w13[e, I:])
                moe.load_weight(f"experts.{e}.down_proj.weight", w2[e])
            assert moe.fully_loaded() and moe.w13.shape == (4, I, H), moe.w13.shape
            out = moe(x, logits)
            torch.testing.assert_close(out.double(), reference(), rtol=1e-5, atol=1e-5)
            with open(os.path.join(sys.argv[2], f"ok.{rank}"), "w") as f:  # (four processes' prints share a pipe)
                f.write("OK")

        if __name__ == "__main__":
            mp.spawn(rank_main, args=(int(sys.argv[1]),), nprocs=4)
    """))
    from helpers import free_port
    out = subprocess.run([sys.executable, str(script), str(free_port()), str(tmp_path)], capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.glob("ok.*")) == ["ok.0", "ok.1", "ok.2", "ok.3"], out.stdout[-2000:]


def test_invalid_expert_layouts_name_the_numbers(checkpoints):
    path = checkpoints["qwen3_moe"][0]
    with pytest.raises(ValueError, match=r"moe_tp_size=2 x moe_ep_size=4 = 8 does not fit tp_size=4.*"
                                         r"moe_expert_parallel_size.*--ep_size"):
        LLM(path, tensor_parallel_size=4, moe_expert_parallel_size=4, moe_tensor_parallel_size=2,
            show_progress=False)
    with pytest.raises(ValueError, match=r"moe_expert_parallel_size=3 must divide the model's 8 experts "
                                         r"\(accepted: 1, 2, 4, 8\)"):
        LLM(path, tensor_parallel_size=1, moe_expert_parallel_size=3, show_progress=False)
    with pytest.raises(ValueError, match=r"moe_tensor_parallel_size=4 must divide the experts' intermediate size 30 "
                                         r"\(accepted: 1, 2, 3, 5, 6, 10, 15, 30\)"):
        bad = path + "-inter30"
        build_checkpoint(bad, "qwen3_moe", moe_intermediate_size=30)
        LLM(bad, tensor_parallel_size=4, moe_tensor_parallel_size=4, show_progress=False)


def test_serve_with_ep_size_reports_expert_load(checkpoints):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "serve"))
    from serve_util import start_server
    from transformers import AutoTokenizer

    path, _, _ = checkpoints["mixtral"]
    tok = AutoTokenizer.from_pretrained(path)
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    prompt = "The capital of France"
    ref = tok.decode(hf_greedy(hf, tok.encode(prompt), 40))
    server = start_server(path, "--tp_size", "2", "--ep_size", "2", api_key=None)
    try:
        client = OpenAI(base_url=server.base_url + "/v1", api_key="EMPTY")
        model = client.models.list().data[0].id
        out = client.completions.create(model=model, prompt=prompt, max_tokens=40, temperature=0,
                                        extra_body={"ignore_eos": True})
        assert out.choices[0].text == ref
        # 40 steps ran (the prompt's, then 39 of one token): a 32-step window, then the last 8 steps,
        # flushed once the engine went idle. Every token the model ran went to 2 (top-k) experts in
        # each of the 2 layers; every step of one token routes 1 token each to 2 of the 8 experts
        # (max/mean load 1 / (2/8) = 4), the last reported window being such steps only.
        want = (len(tok.encode(prompt)) + 39) * 2
        deadline = time.monotonic() + 10
        while True:
            text = httpx.get(server.base_url + "/metrics").text
            per_layer: dict = {}
            for line in text.splitlines():
                if line.startswith("meshserve_moe_expert_tokens_total{"):
                    layer = line.split('layer="')[1].split('"')[0]
                    per_layer[layer] = per_layer.get(layer, 0) + float(line.rsplit(" ", 1)[1])
            if per_layer == {"0": want, "1": want} or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert per_layer == {"0": want, "1": want}, text[-2000:]
        ratios = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                  if line.startswith("meshserve_moe_expert_load_ratio_")}
        assert ratios == {"meshserve_moe_expert_load_ratio_mean": 4.0,
                          "meshserve_moe_expert_load_ratio_max": 4.0}, ratios
    finally:
        server.stop()
