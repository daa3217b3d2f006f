"""Fixtures for the bench tests: a tiny BPE tokenizer trained here, independent of shapes.py."""
import pytest

_TEXT = """the cat sat on the mat and the dog ran in the park while birds sang over the trees
a benchmark sends many requests and measures how long the first token takes to arrive
numbers like 12 345 and 6789 mix with words, commas; and other punctuation!""".split("\n")


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<bos>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_TEXT * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>")
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    fast.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
