"""Session reuse and batching, measured on a random Granite-shaped checkpoint (CPU).

    python scripts/bench_generation.py [--layers 8] [--reps 3]

Prints the time to first token of a second chat turn with a session (only the new tokens are
prefilled) against a fresh generate that prefills the whole conversation, and the throughput of
generate_batch against the same prompts one by one. Medians of --reps runs.
"""

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import make_checkpoint  # noqa: E402  (the tests' random-checkpoint writer)

from granite_rs import Generator  # noqa: E402


def median_time(fn, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shape = dict(hidden_size=1024, intermediate_size=2816, num_attention_heads=16, num_key_value_heads=4,
                     num_hidden_layers=args.layers, max_position_embeddings=4096)
        g = Generator(make_checkpoint(Path(tmp) / "m", **shape))
        print(f"model: {shape}")

        history = "The quick brown fox. " * 60  # about 900 tokens of earlier conversation
        turn2 = history + " And now a short follow-up question?"
        one = dict(max_new_tokens=1, ignore_eos=True)

        def session_turn():
            s = g.session()
            s.generate(history, **one)
            t0 = time.perf_counter()
            r = s.generate(turn2, details=True, **one)
            return time.perf_counter() - t0, r

        fresh = median_time(lambda: g.generate(turn2, **one), args.reps)
        runs = [session_turn() for _ in range(args.reps)]
        reused = statistics.median(t for t, _ in runs)
        r = runs[0][1]
        print(f"second turn: {r.prompt_tokens} prompt tokens, {r.cached_tokens} from the session's cache")
        print(f"  time to first token, fresh generate: {fresh * 1e3:8.1f} ms")
        print(f"  time to first token, session:        {reused * 1e3:8.1f} ms   ({fresh / reused:.1f}x faster)")

        prompts = [f"Prompt number {i}: the quick brown fox" for i in range(8)]
        kw = dict(max_new_tokens=32, ignore_eos=True)
        tokens = len(prompts) * kw["max_new_tokens"]
        alone = median_time(lambda: [g.generate(p, **kw) for p in prompts], args.reps)
        batch = median_time(lambda: g.generate_batch(prompts, **kw), args.reps)
        print(f"batch of {len(prompts)} x {kw['max_new_tokens']} new tokens:")
        print(f"  one by one:     {tokens / alone:8.1f} tokens/s")
        print(f"  generate_batch: {tokens / batch:8.1f} tokens/s   ({alone / batch:.1f}x)")


if __name__ == "__main__":
    main()
