"""Quickstart: the embedded default model (SmolLM2-135M-Instruct) answers a chat question.

    .venv/bin/python examples/quickstart.py
"""
from meshserve import LLM, SamplingParams


def main() -> None:
    with LLM() as llm:  # no model given: the embedded default, converted once from its GGUF file
        out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(max_tokens=64, temperature=0))
        print(out.outputs[0].text)
        for o in llm.generate(["Hello, my name is", "The future of AI is"], SamplingParams(max_tokens=24),
                              use_tqdm=False):
            print(f"{o.prompt!r} -> {o.outputs[0].text!r}")


if __name__ == "__main__":  # required when ranks are spawned (tensor_parallel_size > 1)
    main()
