"""The seed's client snippet: the official `openai` client against `meshserve serve`.

    meshserve serve --port 8000 &          # no MODEL: the embedded SmolLM2-135M-Instruct
    python examples/openai_client.py       # or --base-url / --model / --max-tokens

With no --model, the first model the server lists is used (for the seed's TinyLlama server, pass
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

    client = OpenAI(base_url=args.base_url, api_key=args.api_key)
    model = args.model or client.models.list().data[0].id

    response = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": args.prompt}],
        max_tokens=args.max_tokens,
    )

    print(response.choices[0].message.content)


if __name__ == "__main__":
    main()
