"""Fixtures shared by the engine tests."""
import pytest
import torch

from helpers import build_checkpoint


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """The random Llama of tests/helpers.py with its tokenizer and a 512-token context."""
    path = str(tmp_path_factory.mktemp("models") / "tiny-llama")
    build_checkpoint(path, "llama", max_position_embeddings=512)
    return path


@pytest.fixture(scope="session")
def tiny_llama_hf(tiny_llama):
    """(transformers' model in float32, its tokenizer) of tiny_llama: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return (AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(tiny_llama))
