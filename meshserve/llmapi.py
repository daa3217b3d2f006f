"""TensorRT-LLM-style import path: `from meshserve.llmapi import KvCacheConfig, MoeConfig`."""
from meshserve.config import (AttentionDpConfig, CacheTransceiverConfig, CudaGraphConfig, KernelConfig, KvCacheConfig,
                              LlmArgs, MoeConfig, PyTorchBackendConfig, StructuredOutputsConfig)
from meshserve.llm import LLM
from meshserve.outputs import DisaggregatedParams
from meshserve.sampling_params import GuidedDecodingParams, SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "KvCacheConfig", "MoeConfig", "CudaGraphConfig", "AttentionDpConfig",
           "CacheTransceiverConfig", "PyTorchBackendConfig", "KernelConfig", "LlmArgs", "DisaggregatedParams",
           "GuidedDecodingParams", "StructuredOutputsParams", "StructuredOutputsConfig"]
