"""Batch 1 on two builds of ours, without llama.cpp: SmolLM2 (Q4_1 GGUF, f32 HF directory) and the
2B-shaped HF directory of `bench_2b.py --hf-only` (bf16, and `quantize="q4_0"`).

    python scripts/bench_ab.py A,B [--reps 3] [--only q4_1,f32,2b-bf16,2b-q4_0]

A and B are directories holding a granite_rs package with its extension (as for
`bench_compare.py --ab`). Each case runs in a fresh process (`bench_compare.measure`: loaded and
warmed up, a 128-token prompt, greedy; 32 new tokens on SmolLM2, 16 on the 2B shape), the builds
alternated A B, then B A; prints medians and B/A.
"""

import argparse
import statistics

from bench_compare import ROOT, measure, prepare, prompt_ids

CASES = ["q4_1", "f32", "2b-bf16", "2b-q4_0"]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("builds")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--only", default=",".join(CASES))
    args = p.parse_args()
    builds, cases = args.builds.split(","), args.only.split(",")
    paths = prepare(ROOT / "target" / "bench-compare")
    hf2b = str(ROOT / "target" / "bench-2b" / "granite-2b-bf16")
    paths["load"].update({"2b-bf16": [hf2b, {}], "2b-q4_0": [hf2b, {"quantize": "q4_0"}]})
    ids = prompt_ids(paths, 128)
    runs = {}
    for rep in range(args.reps):
        for case in cases:
            new = 16 if case.startswith("2b") else 32
            for b in builds if rep % 2 == 0 else builds[::-1]:
                runs.setdefault((b, case), []).append(measure("granite-rs", case, paths, ids, new, 2, build=b))
    print("| weights | prefill A | prefill B | B/A | decode A | decode B | B/A |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in cases:
        pa, pb = (statistics.median(len(ids) / r["prefill_s"] for r in runs[(b, case)]) for b in builds)
        da, db = (statistics.median(r["decode_tps"] for r in runs[(b, case)]) for b in builds)
        print(f"| {case} | {pa:.1f} | {pb:.1f} | {pb / pa:.3f} | {da:.1f} | {db:.1f} | {db / da:.3f} |")


if __name__ == "__main__":
    main()
