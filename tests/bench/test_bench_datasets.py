"""datasets.py: exact random prompt lengths, ranged lengths, ShareGPT and JSONL parsing."""
import argparse
import json
import logging

import numpy as np
import pytest

from meshserve.bench import datasets


def _num_tokens(tokenizer, text):
    return len(tokenizer(text).input_ids)  # with the BOS the server would add


def test_random_prompts_have_exactly_the_asked_token_count(tiny_tokenizer):
    samples = datasets.random_samples(tiny_tokenizer, num=40, input_len=64, output_len=7, seed=3)
    assert len(samples) == 40
    assert len({s.prompt for s in samples}) == 40
    for s in samples:
        assert s.prompt_len == 64 and s.output_len == 7
        assert _num_tokens(tiny_tokenizer, s.prompt) == 64


def test_ranged_lengths_stay_in_range_and_are_seeded(tiny_tokenizer):
    samples = datasets.random_samples(tiny_tokenizer, num=60, input_len=40, output_len=20,
                                      range_ratio=0.5, seed=1)
    ins = [s.prompt_len for s in samples]
    outs = [s.output_len for s in samples]
    assert min(ins) >= 20 and max(ins) <= 60 and len(set(ins)) > 10
    assert min(outs) >= 10 and max(outs) <= 30 and len(set(outs)) > 5
    assert all(_num_tokens(tiny_tokenizer, s.prompt) == s.prompt_len for s in samples)
    again = datasets.random_samples(tiny_tokenizer, num=60, input_len=40, output_len=20,
                                    range_ratio=0.5, seed=1)
    assert [s.prompt for s in again] == [s.prompt for s in samples]


def test_nano_bench_range_maps_to_100_1024():
    lengths = datasets.sample_lengths(5000, 562, 462 / 562, np.random.default_rng(0))
    assert lengths.min() == 100 and lengths.max() == 1024


def test_without_tokenizer_falls_back_to_words_and_says_so(caplog):
    with caplog.at_level(logging.WARNING):
        samples = datasets.random_samples(None, num=3, input_len=50, output_len=5)
    assert "approximate" in caplog.text or "not an exact" in caplog.text
    assert all(len(s.prompt.split()) == 50 and s.prompt_len == 50 for s in samples)


def test_sharegpt_uses_first_human_turn_and_gpt_length(tmp_path, tiny_tokenizer):
    gpt_reply = "the dog ran in the park while birds sang over the trees"
    data = [
        {"conversations": [{"from": "human", "value": "where did the dog run today?"},
                           {"from": "gpt", "value": gpt_reply}]},
        {"conversations": [{"from": "human", "value": "a prompt with no answer at all"}]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "the cat sat on the mat"}]},
    ]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(data))
    samples = datasets.sharegpt_samples(str(path), tiny_tokenizer, num=1)
    assert samples[0].prompt == "where did the dog run today?"
    assert samples[0].prompt_len == _num_tokens(tiny_tokenizer, "where did the dog run today?")
    assert samples[0].output_len == len(tiny_tokenizer(gpt_reply, add_special_tokens=False).input_ids)
    # The unanswered entry is usable once --output-len fixes the output length.
    fixed = datasets.sharegpt_samples(str(path), tiny_tokenizer, num=2, output_len=32, seed=0)
    assert {s.prompt for s in fixed} == {"where did the dog run today?", "a prompt with no answer at all"}
    assert all(s.output_len == 32 for s in fixed)


def test_jsonl_keeps_file_order_and_per_line_output_len(tmp_path, tiny_tokenizer):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "the cat sat", "output_len": 5}\n\n{"prompt": "on the mat", "output_len": 9}\n')
    samples = datasets.jsonl_samples(str(path), tiny_tokenizer, num=3)
    assert [s.prompt for s in samples] == ["the cat sat", "on the mat", "the cat sat"]
    assert [s.output_len for s in samples] == [5, 9, 5]
    assert samples[0].prompt_len == _num_tokens(tiny_tokenizer, "the cat sat")
    assert [s.output_len for s in datasets.jsonl_samples(str(path), tiny_tokenizer, 2, output_len=4)] == [4, 4]


def test_jsonl_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "ok", "output_len": 3}\n{"text": "no prompt"}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        datasets.jsonl_samples(str(path), None, 2)
    path.write_text('{"prompt": "no length"}\n')
    with pytest.raises(ValueError, match="output_len"):
        datasets.jsonl_samples(str(path), None, 1)


def test_build_samples_requires_a_dataset_path():
    args = argparse.Namespace(dataset="sharegpt", dataset_path=None, output_len=None, seed=0)
    with pytest.raises(ValueError, match="--dataset-path"):
        datasets.build_samples(args, None, 1)
