"""``granite-rs bench``: prefill and decode speed, time to first token, and memory."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any, Optional

from .common import (FORMATTER, USER_ERRORS, CliError, add_model_options, current_rss_bytes, file_rss_bytes,
                     load_generator, one_line, peak_rss_bytes)

EPILOG = """\
Each run generates --new-tokens tokens (greedy, ignoring end-of-sequence) after a prompt of
about --prompt-tokens tokens, after --warmup short warm-up runs. Reported are medians:
prefill speed (prompt tokens / time to first token), time to first token, decode speed
(tokens after the first per second), and the process's RSS after load, peak RSS, and the
resident pages backed by files at the end (weights read in place from a mapped file count there).

examples:
  granite-rs bench
  granite-rs -m ./granite-3.1-2b-instruct --dtype bfloat16 bench --prompt-tokens 512 --json
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("bench", help="measure prefill and decode speed and memory",
                              description="Benchmark prefill, time to first token, decode speed and memory.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length in tokens (%(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, metavar="N", help="tokens to generate per run (%(default)s)")
    p.add_argument("--reps", type=int, default=3, metavar="N", help="timed runs; medians are reported (%(default)s)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (%(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    add_model_options(p, suppress=True)
    p.set_defaults(func=run)


_BENCH_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels, then by punching cards, and later by writing symbols that compilers turned "
    "into instructions. Each step let people think about larger problems while the machine took "
    "care of the details. Today a language model predicts the next word of a text, one token at a "
    "time, using billions of numbers learned from examples. "
)


def bench_prompt(g: Any, n_tokens: int) -> str:
    """A text that encodes to at most ``n_tokens`` tokens, as close as its characters allow."""
    text = _BENCH_TEXT
    while len(g.encode(text)) < n_tokens:
        text += _BENCH_TEXT
    lo, hi = 1, len(text)  # the longest prefix that fits (token counts grow with the prefix)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(g.encode(text[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def run(args: argparse.Namespace) -> int:
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.reps < 1 or args.warmup < 0:
        raise CliError("--prompt-tokens must be >= 1, --new-tokens >= 2, --reps >= 1, --warmup >= 0", 2)
    g, path, load_s = load_generator(args)
    rss_after_load = current_rss_bytes()
    if args.prompt_tokens + args.new_tokens > g.context_length:
        raise CliError(
            f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed the context "
            f"length of {g.context_length} tokens", 2)
    try:
        prompt = bench_prompt(g, args.prompt_tokens)
        kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True, do_sample=False)
        for _ in range(args.warmup):
            g.generate(prompt, max_new_tokens=2, ignore_eos=True, do_sample=False)
        runs = []
        for _ in range(args.reps):
            start = time.perf_counter()
            r = g.generate(prompt, details=True, **kw)
            wall = time.perf_counter() - start
            ttft = r.time_to_first_token
            runs.append({
                "prompt_tokens": r.prompt_tokens,
                "new_tokens": len(r.token_ids),
                "time_to_first_token_s": ttft,
                "prefill_tokens_per_s": r.prompt_tokens / ttft if ttft > 0 else None,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "total_s": wall,
            })
    except USER_ERRORS as e:
        raise CliError(one_line(e)) from None

    def median(key: str) -> Optional[float]:
        values = [run[key] for run in runs if run[key] is not None]
        return statistics.median(values) if values else None

    result = {
        "model": str(path),
        "device": g.device,
        "dtype": g.dtype,
        "weight_types": g.weight_types,
        "weight_bytes": g.weight_bytes,
        "mapped_weight_bytes": g.mapped_weight_bytes,
        "threads": g.num_threads,
        "prompt_tokens": runs[0]["prompt_tokens"],
        "requested_prompt_tokens": args.prompt_tokens,
        "new_tokens": runs[0]["new_tokens"],
        "reps": args.reps,
        "load_s": load_s,
        "prefill_tokens_per_s": median("prefill_tokens_per_s"),
        "time_to_first_token_s": median("time_to_first_token_s"),
        "decode_tokens_per_s": median("decode_tokens_per_s"),
        "total_s": median("total_s"),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak_rss_bytes(),
        "file_rss_bytes": file_rss_bytes(),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    peak = result["peak_rss_bytes"]

    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"model   {path}  ({g.device}, {g.dtype}, {g.num_threads} threads)")
    types = ", ".join(f"{n} {t}" for t, n in g.weight_types.items())
    print(f"weights {g.weight_bytes / 2**20:,.1f} MiB read per token ({types}), "
          f"{g.mapped_weight_bytes / 2**20:,.1f} MiB of them read in place from the mapped file")
    print(f"prompt  {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, "
          f"median of {args.reps} run{'s' if args.reps != 1 else ''}")
    rows = [
        ("load", fmt(load_s, ".2f"), "s"),
        ("prefill", fmt(result["prefill_tokens_per_s"], ",.1f"), "tokens/s"),
        ("time to first token", fmt(None if result["time_to_first_token_s"] is None
                                    else result["time_to_first_token_s"] * 1e3, ",.1f"), "ms"),
        ("decode", fmt(result["decode_tokens_per_s"], ",.1f"), "tokens/s"),
        ("decode weight reads", fmt(None if result["decode_tokens_per_s"] is None
                                    else result["decode_tokens_per_s"] * g.weight_bytes / 1e9, ",.1f"), "GB/s"),
        ("total per run", fmt(result["total_s"], ".3f"), "s"),
        ("RSS after load", fmt(None if rss_after_load is None else rss_after_load / 2**20, ",.1f"), "MiB"),
        ("peak RSS", fmt(None if peak is None else peak / 2**20, ",.1f"), "MiB"),
        ("RSS backed by files", fmt(None if result["file_rss_bytes"] is None
                                    else result["file_rss_bytes"] / 2**20, ",.1f"), "MiB"),
    ]
    print(f"{'metric':<20}  {'value':>12}  unit")
    for name, value, unit in rows:
        print(f"{name:<20}  {value:>12}  {unit}")
    return 0
