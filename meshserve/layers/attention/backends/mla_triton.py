"""The Triton latent-attention backend: decode rows through kernels/mla_decode.py (absorbed form,
KV split over about two programs per SM), prefill rows in the expanded torch form of the reference
(layers/attention/mla.py). Runs on a GPU, or on CPU under Triton's interpreter (TRITON_INTERPRET=1).
CUDA graphs: decode steps (the plan is the common inputs plus a split count fixed per batch size);
steps with prompt tokens run eagerly (supports_mixed_graphs False: the runner captures no
mixed-step graphs for this backend)."""
from __future__ import annotations

import torch

from meshserve.kernels import mla_decode as kernel
from meshserve.layers.attention.backends.triton import INTERPRETER_SMS
from meshserve.kernels.settings import H200, KernelSettings
from meshserve.layers.attention.backend import AttentionMetadata, AttentionShape, common_fields
from meshserve.layers.attention.mla import MLABackend, MLAAttention, MLAMetadata, MLAPart


class TritonMLABackend(MLABackend):
    name = "mla-triton"
    supports_cuda_graphs = True  # decode steps
    supports_mixed_graphs = False

    def __init__(self, shape: AttentionShape, block_size: int, device: torch.device,
                 settings: KernelSettings = H200):
        super().__init__(shape, block_size, device, settings)
        self.num_sms = (torch.cuda.get_device_properties(self.device).multi_processor_count
                        if self.device.type == "cuda" else INTERPRETER_SMS)

    def num_splits(self, num_seqs: int, max_seq_len: int) -> int:
        return kernel.decode_num_splits(num_seqs, self.shape.num_heads, max_seq_len, self.num_sms)

    def latent_decode(self, q_abs: torch.Tensor, kv_cache: torch.Tensor, part: MLAPart, layer: MLAAttention,
                      return_lse: bool):
        return kernel.mla_decode(q_abs, kv_cache, part.block_tables, part.seq_lens, layer.kv_lora_rank,
                                 layer.scale, part.num_splits, return_lse)

    # ---- CUDA graphs: decode steps only --------------------------------------------------------
    def reserve_graph_buffers(self, max_tokens: int, max_seqs: int, decode: bool) -> None:
        if not decode:
            raise NotImplementedError("mixed-step CUDA graphs with latent attention: steps with prompt tokens run "
                                      "eagerly (the runner checks supports_mixed_graphs)")

    def graph_metadata(self, common: AttentionMetadata, num_tokens: int, num_seqs: int,
                       decode: bool) -> MLAMetadata:
        self.reserve_graph_buffers(num_tokens, num_seqs, decode)
        md = MLAMetadata(**common_fields(common), backend=self)
        # every row a decode row, in order; padding rows (seq_len 0) see no key and write slot 0
        md.decode = MLAPart(None, common.query_start_loc, common.seq_lens, common.block_tables, 1,
                            common.max_seq_len, num_seqs, self.num_splits(num_seqs, common.max_seq_len))
        return md

    def graph_accepts(self, md, num_tokens: int, num_seqs: int) -> bool:
        return False  # no mixed-step graphs

    def fill_graph(self, md, graph_md, num_seqs: int) -> None:
        return  # the decode plan is the common inputs the graph runner copies
