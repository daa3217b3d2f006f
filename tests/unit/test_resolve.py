"""What `model=` / `tokenizer=` may name (meshserve/models/resolve.py): Hugging Face Hub ids found
in a cache laid out here the way huggingface_hub lays it out (models--org--name/snapshots/<hash>,
refs/main), honouring HF_HOME and HF_HUB_OFFLINE, with one-line errors when an id cannot be had;
benchmark shapes only with random weights; and the model package standing without bench/."""
from __future__ import annotations

import ast
import os
import pathlib
import socket

import pytest

import meshserve
from meshserve.models import resolve

REPO_ID = "tiny-org/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out_hub_cache(hf_home: pathlib.Path, repo_id: str, files: dict[str, str]) -> pathlib.Path:
    """A snapshot as huggingface_hub stores it: hub/models--org--name/{refs/main, snapshots/<rev>/...}."""
    repo = hf_home / "hub" / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for name, text in files.items():
        (snapshot / name).write_text(text)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    home = tmp_path / "hf"
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return home


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"  # nothing listens once it is closed


def test_a_cached_hub_id_resolves_to_its_snapshot_offline(hf_home):
    snapshot = lay_out_hub_cache(hf_home, REPO_ID, {"config.json": "{}", "model.safetensors": "x"})
    assert resolve.resolve_model_path(REPO_ID, load_format="auto") == str(snapshot)
    assert resolve.resolve_tokenizer_path(REPO_ID) == str(snapshot)


def test_a_cached_hub_id_resolves_when_the_hub_cannot_be_reached(hf_home, monkeypatch):
    snapshot = lay_out_hub_cache(hf_home, REPO_ID, {"config.json": "{}", "model.safetensors": "x"})
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", closed_port_url())
    assert resolve.resolve_model_path(REPO_ID, load_format="auto") == str(snapshot)


def test_an_uncached_hub_id_offline_is_one_line_naming_the_id_the_cache_and_the_offline_flag(hf_home):
    with pytest.raises(FileNotFoundError) as e:
        resolve.resolve_model_path("tiny-org/absent", load_format="auto")
    msg = str(e.value)
    assert "\n" not in msg
    assert "'tiny-org/absent'" in msg and "HF_HUB_OFFLINE is set" in msg
    assert str(hf_home / "hub" / "models--tiny-org--absent") in msg


def test_an_uncached_hub_id_with_the_hub_unreachable_says_so(hf_home, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    url = closed_port_url()
    monkeypatch.setenv("HF_ENDPOINT", url)
    with pytest.raises(FileNotFoundError) as e:
        resolve.resolve_tokenizer_path("tiny-org/absent")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("tokenizer 'tiny-org/absent' is not in the Hugging Face cache")
    assert f"the Hugging Face Hub at {url} cannot be reached" in msg


def test_a_cached_snapshot_without_weights_is_an_error_unless_the_weights_are_random(hf_home):
    snapshot = lay_out_hub_cache(hf_home, REPO_ID, {"config.json": "{}", "tokenizer.json": "{}"})
    with pytest.raises(FileNotFoundError, match="has no .safetensors weights .HF_HUB_OFFLINE is set"):
        resolve.resolve_model_path(REPO_ID, load_format="auto")
    assert resolve.resolve_model_path(REPO_ID, load_format="dummy") == str(snapshot)


@pytest.mark.parametrize("name", ["./models/nope", "/no/such/folder", "a/b/c", "weights.gguf"])
def test_a_missing_path_is_not_taken_for_a_hub_id(hf_home, name):
    with pytest.raises(FileNotFoundError) as e:
        resolve.resolve_model_path(name)
    msg = str(e.value)
    assert msg.startswith(f"model {name!r}: no such file or folder; accepted:") and "org/name" in msg
    assert "llama-3.1-8b" in msg  # the shapes are listed


def test_a_shape_needs_random_weights():
    with pytest.raises(ValueError) as e:
        resolve.resolve_model_path("llama-3.1-8b", load_format="auto")
    assert "load_format='dummy'" in str(e.value) and "load_format='auto'" in str(e.value)


def test_the_model_package_does_not_import_bench():
    """Every import in meshserve/models, function-level ones too: none reaches meshserve.bench."""
    models_dir = pathlib.Path(meshserve.__file__).parent / "models"
    offenders = []
    for path in sorted(models_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[:2] == ["meshserve", "bench"]]
    assert not offenders


def test_bench_shapes_keeps_its_names():
    from meshserve.bench import shapes as bench_shapes
    from meshserve.models import shapes

    for name in ("SHAPES", "materialize_shape", "resolve_model", "canonical_name", "build_tokenizer"):
        assert getattr(bench_shapes, name) is getattr(shapes, name)
    assert callable(bench_shapes.weight_bytes) and callable(bench_shapes.kv_bytes_per_token)


def test_hub_cache_dir_follows_huggingface_hub_rules(monkeypatch, tmp_path):
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert resolve.hub_cache_dir() == os.path.expanduser(os.path.join("~", ".cache", "huggingface", "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert resolve.hub_cache_dir() == str(tmp_path / "home" / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    assert resolve.hub_cache_dir() == str(tmp_path / "cache")


OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def test_a_revision_picks_that_snapshot_of_the_cache(hf_home):
    """A branch (refs/v2) and a commit hash each resolve to their own snapshot; no revision is main's."""
    main = lay_out_hub_cache(hf_home, REPO_ID, {"config.json": '{"v": 1}', "model.safetensors": "x"})
    repo = main.parent.parent
    v2 = repo / "snapshots" / OTHER
    v2.mkdir()
    (v2 / "config.json").write_text('{"v": 2}')
    (v2 / "model.safetensors").write_text("y")
    (repo / "refs" / "v2").write_text(OTHER)
    assert resolve.resolve_model_path(REPO_ID, load_format="auto") == str(main)
    assert resolve.resolve_model_path(REPO_ID, load_format="auto", revision="v2") == str(v2)
    assert resolve.resolve_model_path(REPO_ID, load_format="auto", revision=OTHER) == str(v2)
    assert resolve.resolve_tokenizer_path(REPO_ID, "v2") == str(v2)
    assert resolve.resolve_tokenizer_path(None, "v2", model=REPO_ID) == str(v2)  # the model's, at v2
    assert resolve.resolve_tokenizer_path(None, None, model=REPO_ID) is None  # the model's own folder


def test_a_revision_that_is_not_cached_offline_names_it(hf_home):
    lay_out_hub_cache(hf_home, REPO_ID, {"config.json": "{}", "model.safetensors": "x"})
    with pytest.raises(FileNotFoundError) as e:
        resolve.resolve_model_path(REPO_ID, load_format="auto", revision="v9")
    assert "\n" not in str(e.value) and f"'{REPO_ID}' at revision 'v9' is not in the Hugging Face cache" in str(e.value)


def test_a_revision_for_what_is_not_a_hub_id_is_refused(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    for model, words in ((str(folder), "a local path"), (None, "the embedded default model"),
                         ("llama-3.1-8b", "a benchmark shape")):
        with pytest.raises(ValueError, match=f"revision='v2' applies to a Hugging Face Hub id; .*{words}"):
            resolve.resolve_model_path(model, load_format="dummy", revision="v2")
    with pytest.raises(ValueError, match="tokenizer_revision='v2'"):
        resolve.resolve_tokenizer_path(str(folder), "v2")


def test_revision_flags_reach_the_engine_args():
    from meshserve.commands.serve import build_parser, llm_args_from_cli
    args = llm_args_from_cli(build_parser().parse_args([REPO_ID, "--revision", "v2", "--tokenizer_revision", "t1"]))
    assert (args.revision, args.tokenizer_revision) == ("v2", "t1")
