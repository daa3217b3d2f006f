"""The seed's client against the disaggregated orchestrator (`meshserve disaggregated -c
disagg-config.yml`): the official `openai` client, a chat completion, then the same one streamed.

    python examples/disaggregated/client.py        # or --base-url / --model / --prompt / --max-tokens

With no --model, the first model the servers list is used (the seed's TinyLlama servers:
--model TinyLlama-1.1B-Chat-v1.0).
"""
import argparse

from openai import OpenAI


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", default="http://localhost:8000/v1")
    parser.add_argument("--api-key", default="EMPTY")
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default="Explain quantum computing")
    parser.add_argument("--max-tokens", type=int, default=512)
    args = parser.parse_args()

    # Connect to disaggregated orchestrator
    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id

    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
    )
    print(response.choices[0].message.content)
    print(f"-- {response.usage.completion_tokens} tokens; now streamed:", flush=True)

    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
        stream=True,
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            print(chunk.choices[0].delta.content, end="", flush=True)
    print()


if __name__ == "__main__":
    main()
