"""GGUF -> HF folder conversion: dequantize every tensor with the `gguf` package (F32, F16, BF16,
Q8_0, Q4_0, Q4_1, K-quants: whatever gguf.quants supports), undo llama.cpp's q/k row permutation,
write config.json + safetensors, and save the tokenizer transformers builds from the same file.
Done once per file; the folder is then loaded like any checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile

import numpy as np
from safetensors.numpy import save_file  # not safetensors.torch: `meshserve serve`'s front stays free of torch

from meshserve.progress import progress_bar

logger = logging.getLogger(__name__)

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_PERMUTED = ("llama", "mistral")  # llama.cpp's converter permutes q/k rows for these

_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}


def hf_name(gguf_name: str) -> str:
    base, _, kind = gguf_name.rpartition(".")
    if base == "token_embd":
        return f"model.embed_tokens.{kind}"
    if base == "output_norm":
        return f"model.norm.{kind}"
    if base == "output":
        return f"lm_head.{kind}"
    if base.startswith("blk."):
        _, idx, part = base.split(".", 2)
        if part in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[part]}.{kind}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no known HF name")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    v = f.contents()
    return v


def gguf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {', '.join(ARCHITECTURES)}")
    g = lambda k, d=None: _field(reader, f"{arch}.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = g("vocab_size")
    if vocab is None:
        embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
        vocab = int(embd.shape[-1])
    cfg = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(g("feed_forward_length")),
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g("attention.head_count_kv", heads)),
        "head_dim": int(g("attention.key_length", hidden // heads)),
        "max_position_embeddings": int(g("context_length", 4096)),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "bfloat16",
    }
    if arch == "qwen2":
        cfg["attention_bias"] = True
    return cfg


def convert_gguf(gguf_path: str, out_dir: str, show_progress: bool = True) -> str:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    try:
        reader = GGUFReader(gguf_path)
    except (ValueError, OSError) as e:  # gguf's "GGUF magic invalid", a truncated file, ...
        raise ValueError(f"{gguf_path}: not a GGUF file meshserve can read ({e})") from None
    cfg = gguf_config(reader)
    arch = cfg["model_type"]
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".", prefix=".convert-")
    try:
        tensors = {}
        for t in progress_bar(reader.tensors, desc=f"Dequantizing {os.path.basename(gguf_path)}",
                              disable=not show_progress, unit="tensor"):
            w = dequantize(t.data, t.tensor_type).astype(np.float32)
            shape = [int(x) for x in reversed(t.shape.tolist())]  # GGUF lists dims fastest-first
            w = w.reshape(shape)
            name = hf_name(t.name)
            if arch in _PERMUTED and t.name.endswith(("attn_q.weight", "attn_k.weight")):
                n = cfg["num_attention_heads"] if "attn_q" in t.name else cfg["num_key_value_heads"]
                w = _unpermute(w, n)
            tensors[name] = np.ascontiguousarray(w)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]}
        with open(os.path.join(tmp, "generation_config.json"), "w") as f:
            json.dump(gen, f, indent=2)
        _save_tokenizer(gguf_path, tmp)
        # another process converting the same file at once (two servers started together) may have
        # finished first: its whole folder stays (it may be loading from it) and ours is dropped
        if os.path.exists(os.path.join(out_dir, "config.json")):
            return out_dir
        if os.path.exists(out_dir):  # a conversion that died half-way
            shutil.rmtree(out_dir, ignore_errors=True)
        try:
            os.replace(tmp, out_dir)
        except OSError:  # renamed into place by another process between the check and here
            if not os.path.exists(os.path.join(out_dir, "config.json")):
                raise
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _save_tokenizer(gguf_path: str, out_dir: str) -> None:
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    if "tokenizer.ggml.tokens" not in GGUFReader(gguf_path).fields:
        logger.warning("%s carries no tokenizer: pass tokenizer=... or use token ids", gguf_path)
        return
    tok = AutoTokenizer.from_pretrained(os.path.dirname(os.path.abspath(gguf_path)),
                                        gguf_file=os.path.basename(gguf_path))
    tok.save_pretrained(out_dir)


FINGERPRINT_CHUNKS = 64  # 64 KiB pieces spread over the file, with its first and last MiB
FINGERPRINT_PIECE = 64 * 2**10


def fingerprint(path: str) -> str:
    """A key for a GGUF file's content that does not read all of it (a 40 GB file would take a minute):
    the size, the first and last MiB (header, metadata, tensor index, the last tensor's end) and 64
    pieces of 64 KiB spread evenly between. The same file in another clone, venv or folder gets the same
    key, so it is converted once (a key of path and mtime converted the embedded model again for every
    clone and kept each copy, 517 MB apiece); different weights differ in the pieces."""
    size = os.path.getsize(path)
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        offsets = [0, max(0, size - 2**20)] + [size * i // (FINGERPRINT_CHUNKS + 1)
                                               for i in range(1, FINGERPRINT_CHUNKS + 1)]
        for offset in offsets:
            f.seek(offset)
            digest.update(f.read(2**20 if offset in offsets[:2] else FINGERPRINT_PIECE))
    return digest.hexdigest()[:12]


def cached_conversion(gguf_path: str, cache_root: str, show_progress: bool = True) -> str:
    key = fingerprint(gguf_path)
    stem = os.path.splitext(os.path.basename(gguf_path))[0]
    out = os.path.join(cache_root, f"{stem}-{key}")
    if not os.path.exists(os.path.join(out, "config.json")):
        os.makedirs(cache_root, exist_ok=True)
        logger.info("Converting %s to %s (once)", gguf_path, out)
        convert_gguf(gguf_path, out, show_progress)
    return out
