"""Settings the engine cannot honour yet are refused with a ValueError naming the setting and
its value, never accepted and ignored; their defaults still construct an engine."""
import pytest

from helpers import build_checkpoint
from meshserve import LLM

KV = {"tokens_per_block": 4, "max_tokens": 256}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("refused"))
    build_checkpoint(path, "llama")
    return path


@pytest.mark.parametrize("kwargs, match", [
    (dict(cp_config={"cp_type": "ulysses"}), r"cp_config=\{'cp_type': 'ULYSSES'\} needs context_parallel_size > 1"),
    (dict(moe_config={"backend": "CUTLASS"}), r"moe_config.backend='CUTLASS'.*no experts"),
    (dict(attention_dp_config={"enable_balance": True}), r"attention_dp_config=.*'enable_balance': True"),
    (dict(backend="tensorrt"), r"backend='tensorrt' is not supported; accepted: 'pytorch'"),
])
def test_unsupported_setting_is_refused_by_name(ckpt, kwargs, match):
    with pytest.raises(ValueError, match=match):
        LLM(ckpt, show_progress=False, kv_cache_config=KV, **kwargs)


def test_defaults_of_those_settings_are_accepted(ckpt):
    with LLM(ckpt, show_progress=False, kv_cache_config=KV, moe_config={"backend": "auto"}, backend="pytorch",
             attention_dp_config={}) as llm:
        assert llm.generate([[1, 2, 3]], use_tqdm=False)[0].outputs[0].token_ids
