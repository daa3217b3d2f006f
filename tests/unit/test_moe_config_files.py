"""Tuned MoE kernel config files (kernels/moe.py: load_config_table, find_config_table, default_config)
on CPU: the JSON format benchmarks/tune_moe.py writes, the nearest-T lookup, the file found by shape,
dtype and GPU name (with $MESHSERVE_MOE_CONFIG_DIR first), the built-in table otherwise, malformed
files refused with the path; fused_experts running a loaded table under Triton's interpreter; and the
tuner itself as a dry run on tiny shapes."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton_only = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")
pytestmark = triton_only

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _gemm(bn, bk, gm=1, w=4, s=3):
    return {"block_n": bn, "block_k": bk, "group_m": gm, "num_warps": w, "num_stages": s}


DOC = {"format": "meshserve-moe-configs", "version": 1, "E": 8, "H": 64, "I": 32, "K": 4, "dtype": "float32",
       "device": "NVIDIA H200",
       "configs": {"1": {"block_m": 16, "gate_up": _gemm(16, 32), "down": _gemm(32, 16), "us": 12.5,
                         "down_sum": _gemm(8, 16, 1, 4, 1),  # the two-kernel decode path
                         "gate_up_gemv": _gemm(4, 32, 1, 4, 1)},  # its gated product as GEMVs
                   "16": {"block_m": 32, "gate_up": _gemm(32, 32, 2), "down": _gemm(16, 32, 1, 8, 2)},
                   "256": {"block_m": 64, "gate_up": _gemm(32, 16), "down": _gemm(64, 32, 8)}}}


@pytest.fixture
def moe(monkeypatch):
    from meshserve.kernels import moe, moe_config
    monkeypatch.setattr(moe_config, "_FOUND", {})
    monkeypatch.delenv(moe.CONFIG_DIR_ENV, raising=False)
    return moe


def write(path, doc=DOC):
    with open(path, "w") as f:
        json.dump(doc, f)
    return str(path)


def test_load_and_nearest_token_count(tmp_path, moe):
    table = moe.load_config_table(write(tmp_path / "t.json"))
    one, sixteen, big = (moe.config_from_dict(DOC["configs"][k]) for k in ("1", "16", "256"))
    assert sixteen.down == moe.GemmConfig(16, 32, 1, 8, 2) and sixteen.block_m == 32
    assert one.down_sum == moe.GemmConfig(8, 16, 1, 4, 1) and sixteen.down_sum is None
    assert one.gate_up_gemv == moe.GemmConfig(4, 32, 1, 4, 1) and sixteen.gate_up_gemv is None
    assert table(1, 4) is not None and table(1, 4) == one
    assert table(3, 4) == one  # log2: 1.58 from 1, 2.42 from 16
    assert table(4, 4) == one and table(5, 4) == sixteen  # 4: equally far (2 and 2): the smaller
    assert table(100, 4) == big and table(10 ** 6, 4) == big
    assert table(2, 8) == table(4, 4)  # T scaled by K / the file's K
    # round trip of the writer's own helper
    assert moe.config_from_dict(moe.config_to_dict(big)) == big
    assert moe.config_from_dict(moe.config_to_dict(one)) == one


def test_file_names_and_gpu_tags(moe):
    assert moe.gpu_tag("NVIDIA H200") == "H200"
    assert moe.gpu_tag("NVIDIA H100 80GB HBM3") == "H100_80GB_HBM3"
    assert moe.config_file_name(128, 2048, 768, torch.bfloat16, "NVIDIA H200") == "moe_E128_H2048_I768_bf16_H200.json"


def test_default_config_finds_the_file_by_shape_dtype_and_gpu(tmp_path, moe, monkeypatch):
    name = moe.config_file_name(8, 64, 32, torch.float32, "NVIDIA H200")
    write(tmp_path / name)
    builtin = moe.default_config(16, 4, 8, 64, 32)
    assert builtin == moe._table_config(16, 4, 8)
    assert moe.default_config(16, 4, 8, 64, 32, torch.float32, "NVIDIA H200") == builtin  # not in CONFIG_DIR
    monkeypatch.setenv(moe.CONFIG_DIR_ENV, str(tmp_path))
    found = moe.default_config(16, 4, 8, 64, 32, torch.float32, "NVIDIA H200")
    assert found == moe.config_from_dict(DOC["configs"]["16"]) and found != builtin
    # another GPU, dtype or shape: the built-in table
    assert moe.default_config(16, 4, 8, 64, 32, torch.float32, "NVIDIA H100") == builtin
    assert moe.default_config(16, 4, 8, 64, 32, torch.bfloat16, "NVIDIA H200") == builtin
    assert moe.default_config(16, 4, 16, 64, 32, torch.float32, "NVIDIA H200") == moe._table_config(16, 4, 16)
    # read once per process (per directory list)
    os.remove(tmp_path / name)
    assert moe.default_config(16, 4, 8, 64, 32, torch.float32, "NVIDIA H200") == found


@pytest.mark.parametrize("bad, match", [
    ("{not json", "JSONDecodeError"),
    (json.dumps({"configs": {}}), "token counts"),
    (json.dumps({"configs": {"1": {"block_m": 16, "gate_up": _gemm(16, 32)}}}), "KeyError: 'down'"),
    (json.dumps({"configs": {"1": {"block_m": 24, "gate_up": _gemm(16, 32), "down": _gemm(16, 32)}}}),
     "powers of two >= 16, got 24"),
    (json.dumps({"configs": {"1": {"block_m": 16, "gate_up": _gemm(16, 32), "down": _gemm(16, 32),
                                   "down_sum": _gemm(6, 32)}}}), "down_sum block_n must be a power of two, got 6"),
    (json.dumps({"configs": {"1": {"block_m": 16, "gate_up": _gemm(16, 32), "down": _gemm(16, 32),
                                   "down_sum": _gemm(8, 32), "gate_up_gemv": _gemm(3, 32)}}}),
     "gate_up_gemv block_n must be a power of two, got 3"),
    (json.dumps({"configs": {"1": {"block_m": 16, "gate_up": _gemm(16, 32), "down": _gemm(16, 32),
                                   "gate_up_gemv": _gemm(4, 32)}}}), "gate_up_gemv needs down_sum"),
])
def test_malformed_files_name_the_path(tmp_path, moe, bad, match):
    path = tmp_path / "bad.json"
    path.write_text(bad)
    with pytest.raises(ValueError, match=f"MoE kernel config file {path}: .*{match}"):
        moe.load_config_table(str(path))


def test_fused_experts_runs_a_loaded_table(tmp_path, moe):
    """Each entry's tiles (row blocks 16/32/64, group_m, uneven K tiles; T=1 the two-kernel path)
    give the float64 answer."""
    from test_moe_experts import assert_close, make_case, reference
    table = moe.load_config_table(write(tmp_path / "t.json"))
    for T in (1, 16, 256):
        args = make_case(T, 8, 4, H=64, I=32, seed=T)
        seen = []
        out = moe.fused_experts(*args, configs=lambda *s: seen.append(table(*s)) or table(*s))
        assert seen == [moe.config_from_dict(DOC["configs"][str(T)])]
        assert_close(out, reference(*args), 1e-5)


def test_tuner_dry_run_writes_a_loadable_file(tmp_path, moe):
    """benchmarks/tune_moe.py end to end on tiny shapes under the interpreter (eager wall-clock
    timings instead of CUDA graphs): the file it writes loads and names a config per T."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = tmp_path / "cfg"
    # --merge: an older table of the shape, whose T=64 entry is kept and whose T=1 entry is replaced
    older = dict(DOC, E=4, H=32, I=16, K=2, configs={"1": DOC["configs"]["16"], "64": DOC["configs"]["256"]})
    merge = write(tmp_path / "older.json", older)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "tune_moe.py"), "--device", "cpu",
                        "--H", "32", "--I", "16", "--E", "4", "--K", "2", "--tokens", "1,8", "--max-candidates", "1",
                        "--out", str(out), "--merge", merge],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (path,) = list(out.iterdir())
    assert path.name == "moe_E4_H32_I16_bf16_cpu.json"
    table = moe.load_config_table(str(path))
    assert [t for t, _ in table.entries] == [1, 8, 64] and table.top_k == 2
    assert table(64, 2) == moe.config_from_dict(DOC["configs"]["256"])
    assert table(1, 2) != moe.config_from_dict(DOC["configs"]["16"])  # tuned: block_m 16, not the old 32
    assert "best config" in r.stdout


def test_every_shipped_table_loads_under_its_own_name(moe):
    """The files in meshserve/kernels/configs/: each loads, and its name is the one find_config_table
    looks for with the shape, dtype and GPU written inside it."""
    shipped = sorted(f for f in os.listdir(moe.CONFIG_DIR) if f.endswith(".json"))
    assert shipped
    for name in shipped:
        path = os.path.join(moe.CONFIG_DIR, name)
        with open(path) as f:
            doc = json.load(f)
        dtype = getattr(torch, doc["dtype"])
        assert moe.config_file_name(doc["E"], doc["H"], doc["I"], dtype, doc["device"]) == name
        table = moe.load_config_table(path)
        assert table(1, doc["K"]) is not None
        assert moe.find_config_table(doc["E"], doc["H"], doc["I"], dtype, doc["device"]).source == path
