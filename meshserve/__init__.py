"""meshserve: a distributed LLM inference engine and OpenAI-compatible server."""
from meshserve.beam_search import BeamSearchParams
from meshserve.outputs import CompletionOutput, DisaggregatedParams, Logprob, RequestOutput
from meshserve.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in torch and transformers; import it lazily so `meshserve bench` starts fast.
    if name == "LLM":
        from meshserve.llm import LLM
        return LLM
    if name in ("KvCacheConfig", "MoeConfig", "CudaGraphConfig"):
        from meshserve import config
        return getattr(config, name)
    raise AttributeError(f"module 'meshserve' has no attribute {name!r}")


__all__ = ["LLM", "SamplingParams", "RequestOutput", "CompletionOutput", "KvCacheConfig", "MoeConfig",
           "DisaggregatedParams", "StructuredOutputsParams", "GuidedDecodingParams", "BeamSearchParams", "Logprob"]
