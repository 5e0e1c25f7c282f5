"""Time to first token with a cached system prompt against the same prompt uncached.

    python scripts/bench_prefix.py [--model PATH] [--quantize q8_0] [--system-tokens 1024] [--reps 5]

One Generator with prefix caching as it is by default (exact where it can be; --all: every
block, `prefix_caching=True`). A system prompt of about --system-tokens tokens (a
document repeated) followed by one of several short questions, chat-formatted. "uncached": a
system prompt no request has used before (a number at its start differs each time), so every
token is computed; "cached": the same system prompt as the request before, so its whole blocks
come from the cache. The two alternate; medians of --reps. Prints the CPU's model name.
"""

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import cpu_name  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import _find_real_model  # noqa: E402

from granite_rs import Generator  # noqa: E402

DOCUMENT = (
    "You are the support assistant of a company that sells bicycles. Answer briefly and politely. "
    "Our shop opens at nine and closes at six, Monday to Saturday. Returns are accepted within 30 days "
    "with the receipt. Repairs take two to five working days; the price depends on the parts. "
)
QUESTIONS = ["When do you open?", "Can I return a helmet?", "How long does a repair take?", "Hi"]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--quantize")
    parser.add_argument("--system-tokens", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--all", action="store_true", help="prefix_caching=True")
    args = parser.parse_args()
    path = args.model or _find_real_model()[0]
    g = Generator(path, quantize=args.quantize, prefix_caching=True if args.all else None)
    if g.model_info["prefix_caching"] == "off":
        sys.exit("prefix caching is off by default for this model on this CPU: pass --all")
    per_copy = len(g.encode(DOCUMENT, add_special_tokens=False))
    copies = max(1, args.system_tokens // per_copy)

    def prompt(version: int, question: str) -> str:
        system = f"Version {version}. " + DOCUMENT * copies
        return g.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": question}])

    kw = dict(max_new_tokens=1, details=True)
    g.generate(prompt(0, "Hi"), **kw)  # warm-up
    ttft: dict[str, list[float]] = {"uncached": [], "cached": []}
    cached_tokens, prompt_tokens = [], []
    for rep in range(args.reps):
        for i, question in enumerate(QUESTIONS[:2]):
            version = 1000 + 2 * rep + i
            r = g.generate(prompt(version, question), **kw)
            assert r.cached_tokens == 0, r.cached_tokens
            ttft["uncached"].append(r.time_to_first_token)
            r = g.generate(prompt(version, QUESTIONS[2 + i]), **kw)
            ttft["cached"].append(r.time_to_first_token)
            cached_tokens.append(r.cached_tokens)
            prompt_tokens.append(r.prompt_tokens)
    print(f"model: {path.name}{f' quantize={args.quantize}' if args.quantize else ''}; CPU: {cpu_name()}; "
          f"prefix caching: {g.model_info['prefix_caching']}")
    print(f"prompts of {min(prompt_tokens)}-{max(prompt_tokens)} tokens; cached: {min(cached_tokens)}-"
          f"{max(cached_tokens)} of them")
    u, c = statistics.median(ttft["uncached"]), statistics.median(ttft["cached"])
    print(f"  time to first token: uncached {u * 1000:.1f} ms, cached {c * 1000:.1f} ms ({c / u:.1%} of uncached)")


if __name__ == "__main__":
    main()
