"""cuda_graph_config onto what the model runner captures (engine/setup.py runner_config): decode
batch sizes, the token buckets of prefill-step graphs, padding. Pure mapping: runs on CPU with a
CUDA device named but never touched."""
import pytest
import torch

from helpers import build_checkpoint
from meshserve.config import build_llm_args
from meshserve.worker.runner_setup import runner_config
from meshserve.models.config import ModelConfig

CUDA = torch.device("cuda")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("graph-config"))
    build_checkpoint(path, "llama", num_hidden_layers=1)
    return path, ModelConfig.from_pretrained(path)


def rc(model, device=CUDA, **kw):
    path, cfg = model
    return runner_config(build_llm_args("test", model=path, **kw), path, cfg, device)


def test_defaults_capture_decode_and_prefill_graphs(model):
    r = rc(model, max_num_tokens=600, max_batch_size=24)
    assert r.cuda_graph_batch_sizes == [1, 2, 4, 8, 16, 24]
    assert r.cuda_graph_prefill_sizes == [16, 32, 64, 128, 256, 384, 512, 600]  # capped by max_num_tokens
    assert r.cuda_graph_padding and r.max_batch_size == 24
    assert rc(model).cuda_graph_prefill_sizes[-1] == 2048  # prefill_max_tokens' default


@pytest.mark.parametrize("cg,prefill,padding", [
    ({"prefill_max_tokens": 0}, [], True),
    ({"prefill_max_tokens": 100}, [16, 32, 64, 100], True),
    ({"prefill_token_sizes": [48, 3000, 96]}, [48, 96], True),  # past prefill_max_tokens: dropped
    ({"enable_padding": False}, [], False),  # exact sizes only: mixed steps cannot pad, so eager
])
def test_prefill_graph_options(model, cg, prefill, padding):
    r = rc(model, cuda_graph_config=cg)
    assert r.cuda_graph_prefill_sizes == prefill and r.cuda_graph_padding == padding
    assert r.cuda_graph_batch_sizes  # decode graphs stay


def test_no_graphs_without_cuda_or_when_disabled(model):
    for r in (rc(model, device=torch.device("cpu")), rc(model, cuda_graph_config=None),
              rc(model, cuda_graph_config={"enable": False})):
        assert r.cuda_graph_batch_sizes is None and r.cuda_graph_prefill_sizes is None


def test_decode_graphs_reach_max_batch_size_up_to_512(model):
    """A decode batch above the largest decode graph runs eagerly (hundreds of launches per step):
    graphs follow the engine's max_batch_size up to cuda_graph_config.max_batch_size (512, vLLM's
    default capture limit)."""
    assert rc(model, max_batch_size=384).cuda_graph_batch_sizes[-4:] == [288, 320, 352, 384]
    assert rc(model, max_batch_size=1024).cuda_graph_batch_sizes[-1] == 512
    assert rc(model, max_batch_size=1024, cuda_graph_config={"max_batch_size": 256}).cuda_graph_batch_sizes[-1] == 256
