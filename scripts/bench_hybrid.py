"""granite-rs on a model shaped like a Granite 4.0-H hybrid, against the same size all attention.

    python scripts/bench_hybrid.py [--threads 2] [--prompts 128,512] [--new-tokens 32] [--reps 3]

Two random-weight (seed 0, bf16) HF directories under target/bench-hybrid, written once (about
6 GB each), SmolLM2's tokenizer: hidden 2048, 40 layers, 32 heads and 8 KV heads, a shared MLP of
8192, vocab 49152, Granite's multipliers;
- `hybrid`: layers 9, 19, 29 and 39 attention (NoPE), the others Mamba2 (expand 2: 64 heads of
  64, 1 group, state 128, convolution 4), as in granite-4.0-h-micro's 9:1 pattern;
- `attention`: every layer attention with RoPE (granite-4.0-micro's kind).
Each measurement is in this process, after a warm-up: prefill tokens/s (prompt length over the
time to the first token) and decode tokens/s, greedy, batch 1; the repetitions alternate the two
models and the best is kept. Decode's weight reads are given as a share of the measured copy
bandwidth (numpy, one large array).
"""

import argparse
import sys
import time
from pathlib import Path

import bench_compare
from bench_family import write_checkpoint as write_random_checkpoint

ROOT = Path(__file__).resolve().parent.parent
HIDDEN, LAYERS, HEADS, KV_HEADS, SHARED, VOCAB = 2048, 40, 32, 8, 8192, 49152
MAMBA_HEADS, MAMBA_HEAD_DIM, STATE, CONV = 64, 64, 128, 4
ATTENTION_LAYERS = {9, 19, 29, 39}
MULTIPLIERS = {"embedding_multiplier": 12.0, "residual_multiplier": 0.22, "attention_multiplier": 0.015625,
               "logits_scaling": 8.0}


def write_checkpoint(out: Path, hybrid: bool, tokenizer_dir: Path) -> None:
    types = ["attention" if not hybrid or i in ATTENTION_LAYERS else "mamba" for i in range(LAYERS)]
    config = {
        "architectures": ["GraniteMoeHybridForCausalLM"], "model_type": "granitemoehybrid", "hidden_size": HIDDEN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "intermediate_size": SHARED, "shared_intermediate_size": SHARED, "num_local_experts": 0,
        "num_experts_per_tok": 0, "vocab_size": VOCAB, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 10_000_000.0, "hidden_act": "silu", "tie_word_embeddings": True, "layer_types": types,
        "position_embedding_type": "nope" if hybrid else "rope", "mamba_n_heads": MAMBA_HEADS,
        "mamba_d_head": MAMBA_HEAD_DIM, "mamba_n_groups": 1, "mamba_d_state": STATE, "mamba_d_conv": CONV,
        "mamba_expand": 2, "mamba_chunk_size": 256, "mamba_conv_bias": True, "mamba_proj_bias": False,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "torch_dtype": "bfloat16", **MULTIPLIERS,
    }
    write_random_checkpoint(out, config, tokenizer_dir)


def bandwidth() -> float:
    """Bytes per second of numpy copying 1 GiB (read + write), the best of several."""
    import numpy as np

    a = np.ones(1 << 28, dtype=np.float32)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - t0)
    return 2 * a.nbytes / best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", default="128,512")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    import granite_rs

    work = ROOT / "target" / "bench-hybrid"
    smol = bench_compare.prepare(ROOT / "target" / "bench-compare")
    models = {}
    for kind in ("hybrid", "attention"):
        path = work / kind
        if not (path / "model.safetensors.index.json").exists():
            print(f"writing {path}", file=sys.stderr)
            write_checkpoint(path, kind == "hybrid", Path(smol["hf"]))
        models[kind] = granite_rs.Generator(path, num_threads=args.threads)
    rate = bandwidth()
    ids = list(range(1000, 1000 + max(int(n) for n in args.prompts.split(","))))
    kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True, details=True)
    for g in models.values():
        g.generate_ids(ids[:16], max_new_tokens=4, ignore_eos=True)
    print(f"{args.threads} threads; copy bandwidth {rate / 1e9:.1f} GB/s")
    print("| model | prompt | prefill tok/s | decode tok/s | decode weight reads / bandwidth |")
    print("| --- | --- | --- | --- | --- |")
    for n in (int(x) for x in args.prompts.split(",")):
        best = {k: (0.0, 0.0) for k in models}
        for _ in range(args.reps):
            for kind, g in models.items():
                r = g.generate_ids(ids[:n], **kw)
                prefill, decode = n / r.time_to_first_token, r.decode_tokens_per_s
                best[kind] = (max(best[kind][0], prefill), max(best[kind][1], decode))
        for kind, (prefill, decode) in best.items():
            reads = models[kind].mapped_weight_bytes
            share = f"{reads * decode / rate:.0%}" if reads else "-"
            print(f"| {kind} | {n} | {prefill:.1f} | {decode:.2f} | {share} |")


if __name__ == "__main__":
    main()
