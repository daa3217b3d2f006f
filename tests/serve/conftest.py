"""Fixtures of the server tests; helpers live in serve_util.py (import that, not conftest)."""
import pytest

from helpers import build_checkpoint


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A random Llama with the chat tokenizer of tests/helpers.py and a 2048-token context."""
    path = str(tmp_path_factory.mktemp("models") / "tiny-chat")
    build_checkpoint(path, "llama", max_position_embeddings=2048)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


