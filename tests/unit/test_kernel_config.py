"""kernel_config: the Triton kernels' settings as configuration (config.py KernelConfig), checked
where it is given (LLM keyword, serve YAML), resolved per GPU (kernels/settings.py), carried to
every rank (LlmArgs -> RankSpec JSON -> RunnerConfig) and into the rank's attention backend and
process-wide kernel switches."""
import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from helpers import build_checkpoint
from meshserve import LLM, kernels
from meshserve.config import KernelConfig, LlmArgs, build_llm_args, load_yaml_config
from meshserve.kernels import settings as ks
from meshserve.models.config import ModelConfig
from meshserve.worker.runner_setup import runner_config


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("kernel-config"))
    build_checkpoint(path, "llama", num_hidden_layers=1)
    return path, ModelConfig.from_pretrained(path)


def test_config_fields_are_the_settings_and_default_to_the_device():
    assert set(KernelConfig.model_fields) == set(ks.FIELDS)
    given = KernelConfig().model_dump()
    assert given.pop("disable_triton") is False and set(given.values()) == {None}


@pytest.mark.parametrize("field,value", [
    ("attn_prefill_rows", 100),  # not a power of two
    ("attn_prefill_rows_small", 8),  # below 16
    ("attn_prefill_block_n", 512),
    ("attn_prefill_warps", 3),
    ("attn_prefill_stages", 0),
    ("attn_prefill_stages_small", 9),
    ("attn_prefill_large_tokens", 0),
    ("attn_decode_split_tiles", 0),
    ("attn_decode_block_n", 48),
    ("attn_decode_block_n", 512),
    ("attn_decode_warps", 3),
    ("attn_decode_warps", 32),
    ("gemv_max_m", -1),
    ("gemv_max_m", 17),
    ("attn_heavy_first", "sometimes"),
    ("pdl", "sometimes"),
])
def test_bad_values_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"kernel_config\.{field}={value!r}"):
        build_llm_args("LLM()", kernel_config={field: value})
    with pytest.raises(ValueError, match=rf"kernel_config\.{field}"):
        LLM("unused", kernel_config={field: value})  # refused before any model is looked for


def test_unknown_field_is_refused_listing_the_accepted_ones():
    with pytest.raises(ValueError, match=r"unknown key 'kernel_config\.prefill_rows'.*attn_prefill_rows"):
        build_llm_args("LLM()", kernel_config={"prefill_rows": 64})
    with pytest.raises(ValueError, match="unknown field"):
        ks.resolve({"prefill_rows": 64}, "NVIDIA H200")


def test_a_yaml_config_sets_it(tmp_path):
    path = tmp_path / "serve.yml"
    path.write_text("kernel_config:\n  attn_prefill_rows: 128\n  gemv_max_m: 0\n")
    args = build_llm_args(str(path), **load_yaml_config(str(path)))
    assert args.kernel_config.attn_prefill_rows == 128 and args.kernel_config.gemv_max_m == 0
    path.write_text("kernel_config:\n  attn_prefill_block_n: 96\n")
    with pytest.raises(ValueError, match=rf"{path}: kernel_config\.attn_prefill_block_n=96"):
        build_llm_args(str(path), **load_yaml_config(str(path)))


def test_settings_resolve_per_gpu_with_the_given_fields_on_top(monkeypatch):
    h200 = ks.resolve(None, "NVIDIA H200")
    assert h200 == ks.H200
    # today's tuned values (they were the MESHSERVE_ATTN_* / MESHSERVE_GEMV_MAX_M defaults)
    assert (h200.attn_prefill_rows, h200.attn_prefill_stages, h200.attn_prefill_rows_small,
            h200.attn_prefill_stages_small, h200.attn_prefill_large_tokens, h200.attn_prefill_block_n,
            h200.attn_prefill_warps, h200.attn_decode_split_tiles, h200.attn_heavy_first, h200.gemv_max_m,
            h200.disable_triton) == (256, 2, 128, 3, 2048, 128, 8, 0, True, 1, False)
    assert ks.resolve({}, "NVIDIA L40S") == ks.H200  # a GPU without a row of its own
    assert ks.resolve(None, "cpu") == ks.H200  # Triton's interpreter plans as on the H200
    mine = ks.resolve(KernelConfig(attn_prefill_rows=64, attn_heavy_first=False).model_dump(), "NVIDIA H200")
    assert mine == dataclasses.replace(ks.H200, attn_prefill_rows=64, attn_heavy_first=False)
    a100 = dataclasses.replace(ks.H200, attn_prefill_stages_small=2)
    monkeypatch.setitem(ks.DEVICE_DEFAULTS, "A100", a100)
    assert ks.resolve(None, "NVIDIA A100-SXM4-80GB") == a100
    assert ks.resolve({"attn_prefill_warps": 4}, "NVIDIA A100-SXM4-80GB").attn_prefill_stages_small == 2


def test_it_reaches_every_rank_through_the_rank_spec(model):
    """RankSpec carries args.model_dump() as JSON; a rank rebuilds LlmArgs and its RunnerConfig."""
    path, cfg = model
    args = build_llm_args("LLM()", model=path, kernel_config={"attn_prefill_rows_small": 64, "gemv_max_m": 2})
    on_rank = LlmArgs(**json.loads(json.dumps(args.model_dump())))
    rcfg = runner_config(on_rank, path, cfg, torch.device("cpu"))
    assert rcfg.kernel_config["attn_prefill_rows_small"] == 64 and rcfg.kernel_config["gemv_max_m"] == 2
    settings = ks.resolve(rcfg.kernel_config, "NVIDIA H200")
    assert settings.attn_prefill_rows_small == 64 and settings.attn_prefill_rows == 256


def test_configure_sets_the_process_switches():
    cuda_like = SimpleNamespace(is_cuda=True)
    try:
        kernels.configure(dataclasses.replace(ks.H200, gemv_max_m=4, disable_triton=True))
        assert kernels.GEMV_MAX_M == 4 and not kernels.use_triton(cuda_like)
        kernels.configure(ks.H200)
        assert kernels.GEMV_MAX_M == 1 and kernels.use_triton(cuda_like) == kernels.TRITON_INSTALLED
    finally:
        kernels.configure(ks.H200)


def test_llm_keyword_reaches_the_runner_and_its_attention_backend(model):
    path, _ = model
    with LLM(path, show_progress=False, dtype="float32", device="cpu",
             kernel_config={"attn_prefill_rows": 128, "gemv_max_m": 0}) as llm:
        runner = llm._core.executor.runner
        assert runner.attn_backend.settings is runner.kernel_settings
        assert runner.kernel_settings == dataclasses.replace(ks.H200, attn_prefill_rows=128, gemv_max_m=0)
        assert kernels.GEMV_MAX_M == 0
        report = runner.kernel_config_report()
        assert report["device"] == "cpu" and report["attn_prefill_rows"] == 128
    kernels.configure(ks.H200)


def test_pdl_is_refused_where_it_cannot_run(model):
    """kernel_config.pdl needs a CUDA GPU of compute capability 9.0+: on the CPU the LLM refuses it,
    naming the field and the device (never accepted and ignored)."""
    path, _ = model
    with pytest.raises(ValueError, match=r"kernel_config\.pdl=true needs a CUDA GPU of compute capability 9\.0"
                                         r".*runs on cpu"):
        LLM(path, show_progress=False, dtype="float32", device="cpu", kernel_config={"pdl": True})


def test_configure_sets_pdl_and_its_launch_keywords_come_together():
    try:
        kernels.configure(dataclasses.replace(ks.H200, pdl=True))
        assert kernels.PDL and kernels.pdl_args() == {"USE_PDL": True, "launch_pdl": True}
        kernels.configure(ks.H200)
        assert not kernels.PDL and kernels.pdl_args() == {}
    finally:
        kernels.configure(ks.H200)


def test_every_kernel_launched_with_pdl_waits_for_the_one_before():
    """A kernel launched with PDL that touched its inputs before griddepcontrol.wait would race the
    kernel before it. Every launch in meshserve/kernels passing **kernels.pdl_args() must launch a
    @triton.jit kernel that has a USE_PDL parameter and calls pdl_enter / pdl_wait with it, and every
    kernel with that parameter must be launched that way somewhere."""
    import ast
    import pathlib

    root = pathlib.Path(kernels.__file__).parent
    waiting, launched = {}, set()
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list):
                params = [a.arg for a in node.args.args]
                if "USE_PDL" in params and node.name not in ("pdl_wait", "pdl_launch_next", "pdl_enter"):
                    calls = {ast.unparse(c.func) for c in ast.walk(node) if isinstance(c, ast.Call)}
                    waiting[node.name] = bool(calls & {"pdl_enter", "pdl_wait"})
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                if any(k.arg is None and "pdl_args" in ast.unparse(k.value) for k in node.keywords):
                    launched.add(ast.unparse(node.func.value))
    assert waiting and all(waiting.values()), waiting
    assert launched == set(waiting), (sorted(launched ^ set(waiting)))


def test_pdl_applies_to_steps_up_to_pdl_max_tokens():
    """kernels.step_tokens(n), called for each eager step and before each CUDA graph's capture: PDL
    launches only in steps of up to pdl_max_tokens tokens (it cost 19% of offline throughput on the
    H200 in large steps); without pdl, never."""
    try:
        kernels.configure(dataclasses.replace(ks.H200, pdl=True, pdl_max_tokens=64))
        for n, on in ((1, True), (64, True), (65, False), (8192, False), (2, True)):
            kernels.step_tokens(n)
            assert kernels.pdl_args() == ({"USE_PDL": True, "launch_pdl": True} if on else {}), n
        kernels.configure(ks.H200)
        kernels.step_tokens(1)
        assert kernels.pdl_args() == {}
    finally:
        kernels.configure(ks.H200)


def test_pdl_max_tokens_without_pdl_is_refused():
    with pytest.raises(ValueError, match=r"kernel_config\.pdl_max_tokens=16 applies only with kernel_config\.pdl=true"):
        ks.resolve({"pdl_max_tokens": 16}, "NVIDIA H200")
    assert ks.resolve({"pdl_max_tokens": 16, "pdl": True}, "NVIDIA H200").pdl_max_tokens == 16
    with pytest.raises(ValueError, match=r"kernel_config\.pdl_max_tokens=0"):
        build_llm_args("LLM()", kernel_config={"pdl_max_tokens": 0})
