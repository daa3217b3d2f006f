"""Named model shapes: real configs without weights, for random-weight (`load_format="dummy"`) runs.

`materialize_shape(name, dir)` writes a model folder with the real HF `config.json` of the named
model and a byte-level BPE tokenizer built locally (no download) whose vocabulary has the real
size and the real special-token ids, so `--load-format dummy` runs at the true shape.
`resolve_model` maps a shape name (or a hub id it stands for) to its cached folder; other names
pass through unchanged. models/resolve.py and bench/ both read this module; it imports neither.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

# Bump when the written files change, so stale cached folders are rebuilt.
SHAPE_FORMAT_VERSION = 1

_LLAMA3_ROPE = {
    "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192, "rope_type": "llama3",
}


def _llama31(hidden: int, layers: int, heads: int, intermediate: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
        "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
        "hidden_act": "silu", "hidden_size": hidden, "intermediate_size": intermediate,
        "initializer_range": 0.02, "max_position_embeddings": 131072,
        "num_attention_heads": heads, "num_hidden_layers": layers, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05,
        "rope_scaling": dict(_LLAMA3_ROPE), "rope_theta": 500000.0,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 128256,
    }


_LLAMA3_SPECIALS = (
    ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
     "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>",
     "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
    + [f"<|reserved_special_token_{i}|>" for i in range(3, 248)]
)
_LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
_QWEN3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
]
_CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_MISTRAL_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ message['content'] + '\n\n' }}{% endif %}{% endfor %}"
)


@dataclass(frozen=True)
class TokenizerSpec:
    """Where the special tokens sit: `first_special_id` onwards (Llama, Qwen) or ids 0.. (Mistral)."""
    specials: tuple[str, ...]
    first_special_id: int
    num_tokens: int  # regular + special; may be below the config's (padded) vocab_size
    bos: Optional[str]
    eos: str
    add_bos: bool
    chat_template: str


@dataclass(frozen=True)
class ModelShape:
    config: dict
    tokenizer: TokenizerSpec


SHAPES: dict[str, ModelShape] = {
    "llama-3.1-8b": ModelShape(
        _llama31(hidden=4096, layers=32, heads=32, intermediate=14336),
        TokenizerSpec(tuple(_LLAMA3_SPECIALS), 128000, 128256, "<|begin_of_text|>", "<|eot_id|>",
                      True, _LLAMA3_TEMPLATE)),
    "llama-3.1-70b": ModelShape(
        _llama31(hidden=8192, layers=80, heads=64, intermediate=28672),
        TokenizerSpec(tuple(_LLAMA3_SPECIALS), 128000, 128256, "<|begin_of_text|>", "<|eot_id|>",
                      True, _LLAMA3_TEMPLATE)),
    "qwen3-0.6b": ModelShape(
        {
            "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
            "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": 151643, "eos_token_id": 151645, "head_dim": 128,
            "hidden_act": "silu", "hidden_size": 1024, "intermediate_size": 3072,
            "initializer_range": 0.02, "max_position_embeddings": 40960, "max_window_layers": 28,
            "num_attention_heads": 16, "num_hidden_layers": 28, "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 1000000,
            "sliding_window": None, "use_sliding_window": False, "tie_word_embeddings": True,
            "torch_dtype": "bfloat16", "transformers_version": "4.51.0", "use_cache": True,
            "vocab_size": 151936,
        },
        TokenizerSpec(tuple(_QWEN3_SPECIALS), 151643, 151669, None, "<|im_end|>", False,
                      _CHATML_TEMPLATE)),
    "qwen3-30b-a3b": ModelShape(
        {
            "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 151643,
            "decoder_sparse_step": 1, "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 6144,
            "max_position_embeddings": 40960, "max_window_layers": 48, "mlp_only_layers": [],
            "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
            "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
            "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
            "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
            "vocab_size": 151936,
        },
        TokenizerSpec(tuple(_QWEN3_SPECIALS), 151643, 151669, None, "<|im_end|>", False,
                      _CHATML_TEMPLATE)),
    # Moonlight-16B-A3B (moonshotai): the DeepSeek-V3 architecture at a size one GPU holds
    "moonlight-16b-a3b": ModelShape(
        {
            "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
            "attention_bias": False, "attention_dropout": 0.0, "aux_loss_alpha": 0.001,
            "bos_token_id": 163584, "eos_token_id": 163585, "first_k_dense_replace": 1,
            "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
            "intermediate_size": 11264, "kv_lora_rank": 512, "max_position_embeddings": 8192,
            "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1, "n_routed_experts": 64,
            "n_shared_experts": 2, "norm_topk_prob": True, "num_attention_heads": 16,
            "num_experts_per_tok": 6, "num_hidden_layers": 27, "num_key_value_heads": 16,
            "num_nextn_predict_layers": 0, "q_lora_rank": None, "qk_nope_head_dim": 128,
            "qk_rope_head_dim": 64, "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 50000.0,
            "routed_scaling_factor": 2.446, "scoring_func": "sigmoid", "seq_aux": True,
            "tie_word_embeddings": False, "topk_group": 1, "topk_method": "noaux_tc",
            "torch_dtype": "bfloat16", "transformers_version": "4.48.2", "use_cache": True,
            "v_head_dim": 128, "vocab_size": 163840,
        },
        TokenizerSpec(("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>", "<|im_system|>",
                       "<|im_middle|>"), 163584, 163591, "[BOS]", "[EOS]", False,
                      "{% for message in messages %}{{ '<|im_' + message['role'] + '|>' + message['role'] + "
                      "'<|im_middle|>' + message['content'] + '<|im_end|>' }}{% endfor %}"
                      "{% if add_generation_prompt %}{{ '<|im_assistant|>assistant<|im_middle|>' }}{% endif %}")),
    "mixtral-8x7b": ModelShape(
        {
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
            "hidden_act": "silu", "hidden_size": 4096, "intermediate_size": 14336,
            "initializer_range": 0.02, "max_position_embeddings": 32768,
            "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
            "num_local_experts": 8, "num_experts_per_tok": 2, "output_router_logits": False,
            "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
            "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
            "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
        },
        TokenizerSpec(("<unk>", "<s>", "</s>"), 0, 32000, "<s>", "</s>", True, _MISTRAL_TEMPLATE)),
}
_ALIASES = {
    "meta-llama/llama-3.1-8b": "llama-3.1-8b", "meta-llama/llama-3.1-8b-instruct": "llama-3.1-8b",
    "meta-llama/llama-3.1-70b": "llama-3.1-70b", "meta-llama/llama-3.1-70b-instruct": "llama-3.1-70b",
    "qwen/qwen3-0.6b": "qwen3-0.6b", "mistralai/mixtral-8x7b-v0.1": "mixtral-8x7b",
    "qwen/qwen3-30b-a3b": "qwen3-30b-a3b", "moonshotai/moonlight-16b-a3b": "moonlight-16b-a3b",
    "moonshotai/moonlight-16b-a3b-instruct": "moonlight-16b-a3b", "qwen/qwen3-30b-a3b-instruct-2507": "qwen3-30b-a3b",
    "mistralai/mixtral-8x7b-instruct-v0.1": "mixtral-8x7b",
}

# A little English for the BPE trainer; the rest of the vocabulary is filled synthetically.
_TRAINING_TEXT = """
The quick brown fox jumps over the lazy dog. A language model reads a prompt and writes one token
at a time; each step reads every weight once, so small batches are bound by memory bandwidth and
large batches by arithmetic. The scheduler decides which requests run in the next step, the cache
manager hands out pages of key and value memory, and the sampler picks the next token from logits.
Servers stream tokens back to clients as they are produced, and a benchmark measures the time to
the first token, the time between tokens, and the total time of each request under load.
In the beginning there was the word, and the word was split into pieces, and the pieces were
numbered from zero to the size of the vocabulary. People write about weather, music, history,
science, cooking, travel, sports, mathematics, programming, and many other things every day.
"""


def canonical_name(name: str) -> Optional[str]:
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    return key if key in SHAPES else None


def _synthetic_tokens():
    """Endless word-like pieces: ' e', ' t', ..., ' ee', ' et', ..., 'ee', ... (BFS over letters)."""
    letters = "etaoinshrdlucmfwypvbgkjqxz"
    level = [""]
    while True:
        level = [w + c for w in level for c in letters]
        for w in level:
            yield "\u0120" + w  # byte-level spelling of a leading space
        for w in level:
            if len(w) > 1:
                yield w


def build_tokenizer(spec: TokenizerSpec, model_max_length: int):
    """A byte-level BPE `PreTrainedTokenizerFast` with exactly `spec.num_tokens` ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    num_regular = spec.num_tokens - len(spec.specials)
    trainer = trainers.BpeTrainer(vocab_size=min(num_regular, 2000), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    seed_tok = Tokenizer(models.BPE())
    seed_tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    seed_tok.train_from_iterator(_TRAINING_TEXT.split("\n"), trainer)
    trained = json.loads(seed_tok.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    # Regular ids: 256 bytes, then trained merges, then synthetic merges grown one letter at a time
    # (every prefix of a synthetic piece is already a token, so each merge is well formed).
    pieces = list(pre_tokenizers.ByteLevel.alphabet())
    pieces.sort()
    known = set(pieces)
    for a, b in merges:
        if a + b not in known:
            pieces.append(a + b)
            known.add(a + b)
    for piece in _synthetic_tokens():
        if len(pieces) >= num_regular:
            break
        if piece in known:
            continue
        head, tail = piece[:-1], piece[-1]
        if head not in known:
            continue
        merges.append((head, tail))
        pieces.append(piece)
        known.add(piece)
    pieces = pieces[:num_regular]

    offset = len(spec.specials) if spec.first_special_id == 0 else 0
    vocab = {piece: offset + i for i, piece in enumerate(pieces)}
    if offset:
        vocab.update({s: i for i, s in enumerate(spec.specials)})
    kept = [(a, b) for a, b in merges if a + b in vocab]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=kept))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(spec.specials))  # ids first_special_id.. (or the reserved 0..)
    if spec.add_bos:
        bos_id = tok.token_to_id(spec.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{spec.bos} $A", pair=f"{spec.bos} $A {spec.bos} $B", special_tokens=[(spec.bos, bos_id)])
    assert tok.get_vocab_size(with_added_tokens=True) == spec.num_tokens, tok.get_vocab_size()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=spec.bos, eos_token=spec.eos,
        pad_token=spec.eos, model_max_length=model_max_length, chat_template=spec.chat_template,
        clean_up_tokenization_spaces=False)


def materialize_shape(name: str, dir: str | os.PathLike) -> str:
    """Write config.json, generation_config.json and the tokenizer of shape `name` into `dir`.

    Reuses `dir` when it already holds this version; writes through a temporary folder so a
    concurrent or interrupted run never leaves half a model behind.
    """
    key = canonical_name(name)
    if key is None:
        raise ValueError(f"unknown model shape {name!r}; known shapes: {', '.join(sorted(SHAPES))}")
    shape = SHAPES[key]
    target = Path(dir)
    marker = target / ".meshserve_shape.json"
    if marker.exists():
        try:
            if json.loads(marker.read_text()) == {"shape": key, "version": SHAPE_FORMAT_VERSION}:
                return str(target)
        except (OSError, json.JSONDecodeError):
            pass
    logger.info("Writing model shape %s to %s", key, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        config = shape.config
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        tok_cfg = shape.tokenizer
        generation = {"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
                      "do_sample": False}
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        build_tokenizer(tok_cfg, config["max_position_embeddings"]).save_pretrained(str(tmp))
        (tmp / marker.name).write_text(json.dumps({"shape": key, "version": SHAPE_FORMAT_VERSION}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return str(target)


def default_cache_dir() -> Path:
    """MESHSERVE_CACHE/shapes (default ~/.cache/meshserve/shapes), where models/resolve.py puts them too."""
    root = os.environ.get("MESHSERVE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "meshserve")
    return Path(root) / "shapes"


def resolve_model(name: str, cache_dir: Optional[str | os.PathLike] = None) -> str:
    """A shape name becomes its materialized folder; an existing path or any other name is returned as is."""
    if os.path.exists(name):
        return name
    key = canonical_name(name)
    if key is None:
        return name
    return materialize_shape(key, Path(cache_dir or default_cache_dir()) / key)
