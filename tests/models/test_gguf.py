"""GGUF loading: a tiny Llama written to GGUF with each supported tensor type (F32, F16, Q8_0,
Q4_0, Q4_1), q/k rows permuted as llama.cpp's converter does; meshserve's conversion (gguf
package dequantization) gives the same greedy ids as transformers' own GGUF loader."""
import os

import numpy as np
import pytest
import torch

from helpers import build_checkpoint, make_prompts
from meshserve import LLM, SamplingParams

gguf = pytest.importorskip("gguf")


def permute(w: np.ndarray, n_head: int) -> np.ndarray:  # llama.cpp convert_hf_to_gguf's permute
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}


def write_gguf(hf, path: str, qtype) -> None:
    cfg = hf.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    for name, t in hf.state_dict().items():
        a = t.float().numpy()
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, idx, rest = name.split(".", 3)
            part, kind = rest.rsplit(".", 1)
            gname = f"blk.{idx}.{NAMES[part]}.{kind}"
        if gname.endswith("attn_q.weight"):
            a = permute(a, cfg.num_attention_heads)
        elif gname.endswith("attn_k.weight"):
            a = permute(a, cfg.num_key_value_heads)
        if a.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        elif a.ndim == 2 and qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gname, a.astype(np.float16))
        else:
            w.add_tensor(gname, a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_0", "Q4_1"])
def test_gguf_types_match_transformers_loader(tmp_path, qtype, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))  # not the user's cache: a copy per run

    hf = build_checkpoint(str(tmp_path / "hf"), "llama", tokenizer=False, hidden_size=64, intermediate_size=128,
                          vocab_size=256)
    path = str(tmp_path / f"tiny-{qtype}.gguf")
    write_gguf(hf, path, getattr(gguf.GGMLQuantizationType, qtype))
    ref_model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=os.path.basename(path),
                                                     dtype=torch.float32).eval()
    ref_model.generation_config.eos_token_id = None
    prompts = make_prompts(4, 256, 12, seed=9)
    with LLM(path, skip_tokenizer_init=True, show_progress=False, kv_cache_config={"max_tokens": 1024}) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
    for p, o in zip(prompts, outs):
        with torch.no_grad():
            ref = ref_model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False, pad_token_id=0)
        assert o.outputs[0].token_ids == ref[0, len(p):].tolist()


def test_the_conversion_cache_is_keyed_by_content_not_by_path(tmp_path, monkeypatch):
    """The same GGUF in two folders (two clones, two venvs) is converted once; a file with other
    weights of the same size gets a folder of its own."""
    from meshserve.models import resolve
    from meshserve.models.gguf import fingerprint

    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))
    hf = build_checkpoint(str(tmp_path / "hf"), "llama", tokenizer=False, hidden_size=64, intermediate_size=128,
                          vocab_size=256)
    a, b = tmp_path / "a" / "tiny.gguf", tmp_path / "b" / "tiny.gguf"
    for p in (a, b):
        p.parent.mkdir()
    write_gguf(hf, str(a), gguf.GGMLQuantizationType.F32)
    b.write_bytes(a.read_bytes())
    os.utime(b, (1, 1))  # another mtime too
    first = resolve.resolve_model_path(str(a), show_progress=False)
    assert resolve.resolve_model_path(str(b), show_progress=False) == first
    assert len(os.listdir(tmp_path / "cache" / "models")) == 1
    data = bytearray(a.read_bytes())
    assert len(data) < 2**21  # the first and last MiB are read whole: every byte of this file counts
    data[len(data) // 2] ^= 0xFF  # one byte of the weights
    other = tmp_path / "c" / "tiny.gguf"
    other.parent.mkdir()
    other.write_bytes(bytes(data))
    assert fingerprint(str(other)) != fingerprint(str(a))
    assert resolve.resolve_model_path(str(other), show_progress=False) != first
    assert len(os.listdir(tmp_path / "cache" / "models")) == 2


def test_a_file_that_is_not_gguf_is_one_line_naming_it(tmp_path, monkeypatch):
    from meshserve.models import resolve

    monkeypatch.setenv("MESHSERVE_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "weights.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ValueError) as e:
        resolve.resolve_model_path(str(bad), show_progress=False)
    assert str(e.value) == f"{bad}: not a GGUF file meshserve can read (GGUF magic invalid)"


def test_a_conversion_finished_by_another_process_is_kept(tmp_path):
    """Two servers started together convert the same GGUF at once: the one that finishes second keeps
    the first one's folder (that server may be loading from it) and drops its own; a folder left
    half-written by a conversion that died is replaced. No temporary folder is left behind."""
    from meshserve.models.gguf import convert_gguf

    hf = build_checkpoint(str(tmp_path / "hf"), "llama", tokenizer=False, hidden_size=64, intermediate_size=128,
                          vocab_size=256)
    path = str(tmp_path / "tiny.gguf")
    write_gguf(hf, path, gguf.GGMLQuantizationType.F32)
    out = tmp_path / "cache" / "tiny"
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"half")  # died before config.json
    assert convert_gguf(path, str(out), show_progress=False) == str(out)
    assert (out / "config.json").exists() and (out / "model.safetensors").stat().st_size > 4
    (out / "loading").write_text("the first server reads this folder")
    assert convert_gguf(path, str(out), show_progress=False) == str(out)
    assert (out / "loading").exists()  # not replaced under the first server
    assert sorted(os.listdir(tmp_path / "cache")) == ["tiny"]
