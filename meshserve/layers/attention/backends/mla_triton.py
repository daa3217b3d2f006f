"""The Triton latent-attention backend: decode rows through kernels/mla_decode.py (absorbed form,
KV split over about two programs per SM), prefill rows in the expanded torch form of the reference
(layers/attention/mla.py). Runs on a GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1).
Eager steps only for now: no CUDA graphs."""
from __future__ import annotations

import torch

from meshserve.kernels import mla_decode as kernel
from meshserve.layers.attention.backends.triton import INTERPRETER_SMS
from meshserve.layers.attention.mla import MLABackend, MLAAttention, MLAPart


class TritonMLABackend(MLABackend):
    name = "mla-triton"

    def __init__(self, shape, block_size, device, settings=None):
        super().__init__(shape, block_size, device, *(() if settings is None else (settings,)))
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else INTERPRETER_SMS)

    def num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        return kernel.decode_num_splits(num_seqs, self.shape.num_heads, max_seq_len, self.num_sms)

    def latent_decode(self, q_abs: torch.Tensor, kv_cache: torch.Tensor, part: MLAPart, layer: MLAAttention,
                      return_lse: bool):
        return kernel.mla_decode(q_abs.contiguous(), kv_cache, part.block_tables, part.seq_lens, layer.kv_lora_rank,
                                 layer.scale, part.num_splits, return_lse)
