"""Paged attention: the layer, the backend interface and its backends (vLLM's
vllm/v1/attention/backends/ layout: a backend class, its metadata dataclass, a metadata builder).

  backend.py          AttentionMetadata, AttentionBackend, merge_attention (log-sum-exp merge)
  layer.py            Attention: a layer's heads and KV cache; runs the step's backend
  selector.py         attention_backend (auto | triton | torch) -> a backend object
  backends/torch.py   the reference (SDPA; the softmax written out when the LSE is asked for)
  backends/triton.py  tile plans, KV splits, CUDA-graph plan buffers, the Triton kernels
"""
from meshserve.layers.attention.backend import (AttentionBackend, AttentionMetadata, AttentionShape,
                                                merge_attention)
from meshserve.layers.attention.backends.torch import TorchAttentionBackend, torch_paged_attention, write_kv
from meshserve.layers.attention.layer import Attention
from meshserve.layers.attention.selector import select_attention_backend

__all__ = ["Attention", "AttentionBackend", "AttentionMetadata", "AttentionShape", "TorchAttentionBackend",
           "merge_attention", "select_attention_backend", "torch_paged_attention", "write_kv"]
