"""Run by the launcher tests (torchrun, mpirun, network namespaces): every rank calls LLM(...);
rank 0 writes the greedy ids as JSON. Usage: tp_script.py CKPT OUT.json TP [PP]"""
import json
import sys

from meshserve import LLM, SamplingParams


def main() -> None:
    ckpt, out_path, tp = sys.argv[1], sys.argv[2], int(sys.argv[3])
    pp = int(sys.argv[4]) if len(sys.argv) > 4 else 1
    prompts = json.loads(open(ckpt + "/prompts.json").read())
    with LLM(ckpt, tensor_parallel_size=tp, pipeline_parallel_size=pp, show_progress=False,
             kv_cache_config={"tokens_per_block": 4, "max_tokens": 2048}) as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)
        with open(out_path, "w") as f:
            json.dump([o.outputs[0].token_ids for o in outs], f)


if __name__ == "__main__":
    main()
