"""Many requests against one request alone, on the embedded model (or any --model).

    python scripts/bench_batch.py [--model PATH] [--rows 8] [--new-tokens 64] [--reps 3] [--precision int8]

Eight prompts of different lengths (chat-formatted questions), each generating --new-tokens
tokens (ignore_eos). Prints the tokens/s of one request alone (the first prompt), of the prompts
one after another, of one `generate` per prompt from as many threads at once (the scheduler
batches them), and of generate_batch over all of them; for the threads, how much slower each
request's decode is than alone's (the slowest, and the median); then whether every batch row
equals the same prompt generated alone, greedy and with one seed per row. Medians of --reps
runs, alternated; the CPU's model name is printed with the figures.
"""

import argparse
import concurrent.futures
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import _find_real_model  # noqa: E402

from granite_rs import Generator  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
    "List three prime numbers.",
    "Give me a recipe for pancakes with the quantities for four people, step by step, in metric units.",
    "Hi",
    "Translate 'good morning' into Spanish, French and German.",
    "What does a compiler do? Answer for a ten-year-old, in a short paragraph with one example.",
]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quantize", help="Generator's quantize (e.g. q4_0)")
    parser.add_argument("--precision", help="Generator's matmul_precision (fast, int8, exact)")
    parser.add_argument("--quick", action="store_true", help="only alone and generate_batch; no equality check")
    args = parser.parse_args()
    path = args.model or _find_real_model()[0]
    g = Generator(path, num_threads=args.threads, quantize=args.quantize, matmul_precision=args.precision)
    prompts = [g.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS[: args.rows]]
    kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True)
    lens = [len(g.encode(p)) for p in prompts]
    print(f"model: {path.name}{f' quantize={args.quantize}' if args.quantize else ''}"
          f"{f' matmul_precision={args.precision}' if args.precision else ''}; "
          f"CPU: {cpu_name()}, {args.threads or 'default'} threads")
    print(f"{len(prompts)} prompts of {lens} tokens, {args.new_tokens} new tokens each")

    pool = concurrent.futures.ThreadPoolExecutor(len(prompts))
    decode_rates: dict[str, list[float]] = {"alone": [], "threads": []}

    def alone_run():
        decode_rates["alone"].append(g.generate(prompts[0], details=True, **kw).decode_tokens_per_s)

    def threads_run():
        results = list(pool.map(lambda p: g.generate(p, details=True, **kw), prompts))
        decode_rates["threads"].extend(r.decode_tokens_per_s for r in results)

    runs = [("alone", alone_run),
            ("one by one", lambda: [g.generate(p, **kw) for p in prompts]),
            (f"{len(prompts)} threads", threads_run),
            ("generate_batch", lambda: g.generate_batch(prompts, **kw))]
    runs = [r for r in runs if not (args.quick and r[0] == "one by one")]
    times = {name: [] for name, _ in runs}
    g.generate(prompts[0], max_new_tokens=2)  # warm-up
    for _ in range(args.reps):
        for name, fn in runs:
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    alone = args.new_tokens / statistics.median(times["alone"])
    for name, ts in times.items():
        n = args.new_tokens * (1 if name == "alone" else len(prompts))
        rate = n / statistics.median(ts)
        print(f"  {name:15s} {rate:8.1f} tokens/s  ({rate / alone:.2f}x one request)")
    alone_decode = statistics.median(decode_rates["alone"])
    slowdowns = sorted(alone_decode / r for r in decode_rates["threads"])
    print(f"  each thread's decode vs alone ({alone_decode:.1f} tokens/s): slowest {slowdowns[-1]:.2f}x slower, "
          f"median {statistics.median(slowdowns):.2f}x")

    if args.quick:
        return
    for label, extra in [("greedy", {}), ("seeded sampling", dict(do_sample=True, temperature=0.9, top_p=0.95))]:
        seeds = list(range(1, len(prompts) + 1))
        if extra:
            one = [g.generate(p, seed=s, **kw, **extra) for p, s in zip(prompts, seeds)]
            try:
                batch = g.generate_batch(prompts, seed=seeds, **kw, **extra)
            except Exception as e:  # before per-row values: one seed for all rows
                print(f"  {label}: per-row seeds not accepted ({type(e).__name__}); one seed for all rows")
                one = [g.generate(p, seed=1, **kw, **extra) for p in prompts]
                batch = g.generate_batch(prompts, seed=1, **kw, **extra)
        else:
            one = [g.generate(p, **kw) for p in prompts]
            batch = g.generate_batch(prompts, **kw)
        differ = [i for i, (a, b) in enumerate(zip(one, batch)) if a != b]
        print(f"  {label}: batch rows equal to alone: {len(prompts) - len(differ)}/{len(prompts)}"
              + (f" (rows {differ} differ)" if differ else ""))


if __name__ == "__main__":
    main()
