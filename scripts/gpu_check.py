#!/usr/bin/env python3
"""Checks and times the CUDA build of granite-rs against transformers, on one GPU machine.

Needs Python with torch (CUDA), transformers, safetensors, tokenizers and numpy; no Rust, no
network. Run from a checkout (it reads tests/fixtures) with the wheel built by
scripts/cuda_build.sh:

    python scripts/gpu_check.py --wheel dist-cuda/granite_rs-*.whl

It installs the wheel with `pip --no-deps --target`, preloads the CUDA 13 libraries of the torch
environment (site-packages/nvidia) for the extension, then
  (a) compares our logits and greedy ids with the fixtures' transformers references (f32), and our
      bf16 logits with transformers' bf16 logits on the GPU;
  (b) times decode (batch 1) and prefill for us and for transformers (eager; static cache with
      torch.compile where that works) on a random Granite-3.1-2B-shaped bf16 checkpoint;
  (c) measures copy bandwidth and prints weight bytes / bandwidth as the decode bound.
A markdown table comes last; the exit status is 1 when a check failed.

`--cpu --small` runs the same logic on the CPU with a small model, against an installed CPU build
(a smoke test of this script where there is no GPU).
"""

import argparse
import ctypes
import glob
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
# Loaded in this order (each one's dependencies first).
CUDA_LIBS = ["libcudart.so.13", "libnvrtc.so.13", "libcublasLt.so.13", "libcublas.so.13", "libcurand.so.10"]
FAILED = []


def check(name, ok, detail):
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        FAILED.append(name)


def install(wheel, target):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", target, wheel],
                   check=True)
    sys.path.insert(0, target)


def preload_cuda_libs():
    """Loads the CUDA runtime libraries from the pip packages under site-packages/nvidia."""
    import nvidia  # the namespace package of NVIDIA's wheels, which torch depends on

    dirs = [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "**", "lib"), recursive=True)]
    for name in CUDA_LIBS:
        found = sorted(f for d in dirs for f in glob.glob(os.path.join(d, name + "*")))
        if not found:
            print(f"warning: {name} not found under {nvidia.__path__}")
            continue
        ctypes.CDLL(found[0], mode=ctypes.RTLD_GLOBAL)


def sync(dev):
    import torch

    if dev == "cuda":
        torch.cuda.synchronize()


def median_time(fn, dev, repeat=3):
    times = []
    for _ in range(repeat):
        sync(dev)
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fixture_checks(granite_rs, dev):
    """(a): our f32 logits and greedy ids against the fixtures; bf16 against transformers' bf16."""
    import torch
    from safetensors.numpy import load_file
    from transformers import GraniteForCausalLM

    for case in sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists()):
        if json.loads((case / "config.json").read_text()).get("torch_dtype") != "float32":
            continue
        ref = load_file(str(case / "reference.safetensors"))
        ids = [int(i) for i in ref["input_ids"]]
        gen = granite_rs.Generator(str(case), device=dev, dtype="float32")
        diff = float(np.abs(gen.logits(ids) - ref["logits"]).max())
        check(f"{case.name} f32 logits", diff < 1e-3, f"max |ours - transformers| = {diff:.2e}")
        want = [int(i) for i in ref["greedy_ids"]]
        got = gen.generate_ids(ids, max_new_tokens=len(want), ignore_eos=True, do_sample=False)
        check(f"{case.name} greedy ids", got == want, f"{sum(a == b for a, b in zip(got, want))}/{len(want)} equal")

    case = FIXTURES / "mha_tied"
    ids = [int(i) for i in load_file(str(case / "reference.safetensors"))["input_ids"]]
    ref32 = load_file(str(case / "reference.safetensors"))["logits"]
    model = GraniteForCausalLM.from_pretrained(case, dtype=torch.bfloat16).to(dev).eval()
    with torch.no_grad():
        hf = model(torch.tensor([ids], device=dev)).logits[0].float().cpu().numpy()
    ours = granite_rs.Generator(str(case), device=dev, dtype="bfloat16").logits(ids)
    hf_err, our_err = float(np.abs(hf - ref32).max()), float(np.abs(ours - ref32).max())
    check("mha_tied bf16 logits", our_err <= 2 * hf_err + 1e-2,
          f"max error vs f32: ours {our_err:.3f}, transformers bf16 {hf_err:.3f}; "
          f"ours vs transformers bf16 {float(np.abs(ours - hf).max()):.3f}")


def make_checkpoint(out, small):
    """A random Granite-3.1-2B-shaped (or, small, a tiny) bf16 checkpoint with a word-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GraniteConfig, GraniteForCausalLM

    shape = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                 intermediate_size=512, vocab_size=4096) if small else \
        dict(hidden_size=2048, num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8,
             intermediate_size=8192, vocab_size=49152)
    cfg = GraniteConfig(**shape, max_position_embeddings=4096, rope_theta=10_000_000.0, rms_norm_eps=1e-5,
                        tie_word_embeddings=True, embedding_multiplier=12.0, residual_multiplier=0.22,
                        attention_multiplier=0.015625, logits_scaling=8.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)
    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(dev):
        model = GraniteForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    vocab = {f"t{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(os.path.join(out, "tokenizer.json"))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: counted once
    del model
    return weight_bytes


def prompt(n, vocab):
    rng = np.random.default_rng(n)
    return [int(i) for i in rng.integers(1, vocab, n)]


def time_ours(granite_rs, path, dev, lengths, new_tokens):
    gen = granite_rs.Generator(path, device=dev, dtype="bfloat16")
    ids = lambda n: prompt(n, gen.vocab_size)  # noqa: E731  (the same ids transformers gets)
    kw = dict(ignore_eos=True, do_sample=False, details=True)
    gen.generate_ids(ids(16), max_new_tokens=8, **kw)  # warm-up: kernels load, cuBLAS initializes
    decode = statistics.median(gen.generate_ids(ids(16), max_new_tokens=new_tokens, **kw).decode_tokens_per_s
                               for _ in range(3))
    prefill = {n: n / statistics.median(gen.generate_ids(ids(n), max_new_tokens=1, **kw).time_to_first_token
                                        for _ in range(3)) for n in lengths}
    return decode, prefill


def time_transformers(path, dev, lengths, new_tokens, compiled):
    import torch
    from transformers import GraniteForCausalLM

    model = GraniteForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
    vocab = model.config.vocab_size
    kw = dict(do_sample=False, pad_token_id=0)
    if compiled:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        ids = torch.tensor([prompt(16, vocab)], device=dev)
        gen = lambda n: model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)  # noqa: E731
        for _ in range(2 if compiled else 1):  # warm-up (compilation)
            gen(new_tokens)
        first = median_time(lambda: gen(1), dev)
        total = median_time(lambda: gen(new_tokens), dev)
        decode = (new_tokens - 1) / (total - first)
        prefill = {}
        if not compiled:
            for n in lengths:
                x = torch.tensor([prompt(n, vocab)], device=dev)
                model(x)
                prefill[n] = n / median_time(lambda: model(x, logits_to_keep=1), dev)
    del model
    return decode, prefill


def copy_bandwidth(dev):
    """Bytes per second of a large device-to-device copy (read + write)."""
    import torch

    n = 1 << (30 if dev == "cuda" else 28)
    src = torch.empty(n, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = median_time(lambda: [dst.copy_(src) for _ in range(10)], dev, repeat=5)
    return 2 * n * 10 / t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--wheel", help="install this granite-rs wheel first (pip --no-deps --target)")
    ap.add_argument("--target", default=os.path.join(tempfile.gettempdir(), "granite-rs-site"))
    ap.add_argument("--cpu", action="store_true", help="run everything on the CPU (smoke test)")
    ap.add_argument("--small", action="store_true", help="a small model instead of the 2B shape")
    ap.add_argument("--no-compile", action="store_true", help="skip transformers with torch.compile")
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args()
    dev = "cpu" if args.cpu else "cuda"
    lengths = [64, 128] if args.small else [512, 2048]
    new_tokens = args.new_tokens or (16 if args.small else 256)

    import torch  # first: its CUDA libraries, then ours

    if args.wheel:
        install(args.wheel, args.target)
    if dev == "cuda":
        preload_cuda_libs()
    import granite_rs

    print(f"granite_rs {granite_rs.__version__} from {granite_rs.__file__}; torch {torch.__version__}; "
          f"device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}")
    fixture_checks(granite_rs, dev)

    rows = {}
    with tempfile.TemporaryDirectory() as path:
        weight_bytes = make_checkpoint(path, args.small)
        rows["granite-rs"] = time_ours(granite_rs, path, dev, lengths, new_tokens)
        rows["transformers eager"] = time_transformers(path, dev, lengths, new_tokens, compiled=False)
        if not args.no_compile:
            try:
                rows["transformers static+compile"] = time_transformers(path, dev, lengths, new_tokens, compiled=True)
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"transformers with torch.compile failed: {type(e).__name__}: {e}")
    bandwidth = copy_bandwidth(dev)
    bound = bandwidth / weight_bytes

    print(f"\nweights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
          f"decode bound {bound:.0f} tokens/s ({1e3 / bound:.2f} ms/token)")
    print(f"\n| engine | decode tok/s (b=1, {new_tokens} new) | % of bound | "
          + " | ".join(f"prefill {n} tok/s" for n in lengths) + " |")
    print("|---|---|---|" + "---|" * len(lengths))
    for name, (decode, prefill) in rows.items():
        cells = " | ".join(f"{prefill[n]:.0f}" if n in prefill else "-" for n in lengths)
        print(f"| {name} | {decode:.1f} | {100 * decode / bound:.0f}% | {cells} |")
    print(f"\nchecks: {'all passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
