#!/usr/bin/env python3
"""Checks and times the CUDA build of granite-rs against transformers, on one GPU machine.

Needs Python with torch (CUDA 13), transformers, safetensors, tokenizers and numpy; no Rust, no
network. Run from a checkout (it reads tests/fixtures) with the wheel built by
scripts/cuda_build.sh and, optionally, the CUDA op-test binary (`--ops`; scripts/cuda_build.sh
writes it as dist-cuda/kernels.gz):

    python scripts/gpu_check.py --wheel dist-cuda/granite_rs-*.whl --ops dist-cuda/kernels.gz

It checks first that torch and the driver are CUDA 13 (the wheel links libcudart.so.13), installs
the wheel with `pip --no-deps --target`, preloads the CUDA 13 libraries of the torch environment
(site-packages/nvidia) for the extension, then
  (a) runs the op tests' CUDA cases (tests/kernels.rs `-- --ignored`: every kernel against its CPU
      path, head dims 32 to 256, GQA groups 1 to 16);
  (b) compares our f32 logits and greedy ids with every f32 fixture's transformers reference, the
      device's greedy pick with the host's, our bf16 logits with transformers' bf16 on the GPU,
      and streams, sessions and batches on the GPU with the same calls on the CPU;
  (c) on a random Granite-3.1-2B-shaped bf16 checkpoint: our first-step logits against
      transformers' (bf16, with f32 as the reference); decode at batch 1 after 128 and 2048
      tokens, batch-8 decode, prefill 512 and 2048, for us and transformers (eager; static cache
      with torch.compile where that works), against weight bytes / copy bandwidth.
Each check and each timing row is printed as soon as it is measured; the table comes last; the
exit status is 1 when a check failed.

`--cpu --small` runs the same logic on the CPU with a small model, against an installed CPU build
(a smoke test of this script where there is no GPU).
"""

import argparse
import ctypes
import glob
import gzip
import json
import os
import shutil
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
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def require_cuda13(torch):
    """Stops with a clear message unless torch and the driver are CUDA 13, as the wheel needs."""
    problems = []
    if not (torch.version.cuda or "").startswith("13."):
        problems.append(f"torch {torch.__version__} is built for CUDA {torch.version.cuda}, not 13.x")
    if not torch.cuda.is_available():
        problems.append("torch sees no usable GPU (no driver, or no device)")
    else:
        driver = torch._C._cuda_getDriverVersion()  # e.g. 13000 for CUDA 13.0
        if driver < 13000:
            problems.append(f"the driver supports CUDA {driver // 1000}.{driver % 1000 // 10}, older than 13.0")
    if problems:
        sys.exit("gpu_check: " + "; ".join(problems) + " (the CUDA wheel links libcudart.so.13)")


def install(wheel, target):
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade", "--target", target, wheel],
                   check=True)
    sys.path.insert(0, target)


def cuda_lib_dirs():
    """The lib folders of NVIDIA's pip packages (site-packages/nvidia), which torch depends on."""
    import nvidia

    return [d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "**", "lib"), recursive=True)]


def preload_cuda_libs():
    """Loads the CUDA runtime libraries from the pip packages under site-packages/nvidia."""
    import nvidia

    dirs = cuda_lib_dirs()
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


def op_tests(binary):
    """(a): the CUDA cases of tests/kernels.rs, each reported as a check."""
    if binary.endswith(".gz"):
        with gzip.open(binary) as src, tempfile.NamedTemporaryFile(delete=False, suffix="-kernels") as dst:
            shutil.copyfileobj(src, dst)
        os.chmod(dst.name, 0o755)
        binary = dst.name
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(cuda_lib_dirs() + [os.environ.get("LD_LIBRARY_PATH", "")]))
    run = subprocess.run([binary, "--ignored", "--test-threads=1"], env=env, capture_output=True, text=True)
    results = [line.split() for line in run.stdout.splitlines() if line.startswith("test ") and " ... " in line]
    for words in results:
        check(f"op test {words[1]}", words[-1] == "ok", words[-1])
    if run.returncode != 0 or not results:
        check("op tests", False, f"exit {run.returncode}; output tail:\n{(run.stdout + run.stderr)[-3000:]}")


def f32_fixtures():
    """The fixtures stored in float32 (transformers 4.x writes `torch_dtype`, 5.x `dtype`)."""
    for case in sorted(p for p in FIXTURES.iterdir() if (p / "reference.safetensors").exists()):
        cfg = json.loads((case / "config.json").read_text())
        if cfg.get("dtype", cfg.get("torch_dtype")) == "float32":
            yield case


def fixture_checks(granite_rs, dev):
    """(b): f32 logits and greedy ids against the fixtures; device greedy; bf16 against transformers' bf16."""
    import torch
    from safetensors.numpy import load_file
    from transformers import GraniteForCausalLM

    for case in f32_fixtures():
        ref = load_file(str(case / "reference.safetensors"))
        ids = [int(i) for i in ref["input_ids"]]
        gen = granite_rs.Generator(str(case), device=dev, dtype="float32")
        diff = float(np.abs(gen.logits(ids) - ref["logits"]).max())
        check(f"{case.name} f32 logits", diff < 1e-3, f"max |ours - transformers| = {diff:.2e}")
        want = [int(i) for i in ref["greedy_ids"]]
        kw = dict(max_new_tokens=len(want), ignore_eos=True, do_sample=False)
        got = gen.generate_ids(ids, **kw)  # the pick on the device
        check(f"{case.name} greedy ids", got == want, f"{sum(a == b for a, b in zip(got, want))}/{len(want)} equal")
        host = gen.generate_ids(ids, details=True, top_logprobs=1, **kw).token_ids  # the logits read back
        check(f"{case.name} device greedy = host greedy", got == host, f"{got[:8]}... vs {host[:8]}...")

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


def feature_checks(granite_rs, dev):
    """(b): streams, sessions and batches on `dev` give what the same calls give on the CPU."""
    case = str(FIXTURES / "gqa_untied")
    prompts = ["hello there", "the quick brown fox", "a"]
    kw = dict(max_new_tokens=12, ignore_eos=True, do_sample=False)

    def run(device):
        gen = granite_rs.Generator(case, device=device, dtype="float32")
        out = {"generate": [gen.generate(p, **kw) for p in prompts],
               "stream": ["".join(gen.stream(p, **kw)) for p in prompts],
               "batch": gen.generate_batch(prompts, **kw)}
        session = gen.session()
        first = session.generate(prompts[0], **kw)
        follow_up = session.generate(prompts[0] + first + " and then", details=True, **kw)  # reuses the cache
        out["session"] = [first, follow_up.text, follow_up.cached_tokens]
        fork = session.fork()
        out["fork"] = [fork.generate(" more", **kw), session.generate(" more", **kw)]
        return out

    on_dev, on_cpu = run(dev), run("cpu")
    for name in on_cpu:
        check(f"{name} on {dev} = on cpu", on_dev[name] == on_cpu[name], f"{on_dev[name]!r:.80} vs {on_cpu[name]!r:.80}")
    check(f"stream = generate on {dev}", on_dev["stream"] == on_dev["generate"], "")


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


def logits_check(granite_rs, path, dev, name):
    """(c): our bf16 first-step logits on the timed model against transformers' bf16, f32 the reference."""
    import torch
    from transformers import GraniteForCausalLM

    ids = prompt(64, json.loads((Path(path) / "config.json").read_text())["vocab_size"])
    with torch.no_grad():
        x = torch.tensor([ids], device=dev)
        model = GraniteForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()
        ref = model(x, logits_to_keep=1).logits[0, -1].cpu().numpy()
        model = model.to(torch.bfloat16)
        hf = model(x, logits_to_keep=1).logits[0, -1].float().cpu().numpy()
        del model
    ours = granite_rs.Generator(path, device=dev, dtype="bfloat16").logits(ids)[-1]
    scale = float(np.abs(ref).max())
    hf_err, our_err = float(np.abs(hf - ref).max()) / scale, float(np.abs(ours - ref).max()) / scale
    check(f"{name} bf16 logits", our_err <= 2 * hf_err + 1e-3,
          f"max error / max |logit| vs f32: ours {our_err:.2e}, transformers bf16 {hf_err:.2e}; "
          f"argmax ours {int(ours.argmax())}, transformers bf16 {int(hf.argmax())}, f32 {int(ref.argmax())}")


def time_ours(granite_rs, path, dev, contexts, lengths, new_tokens, batch):
    gen = granite_rs.Generator(path, device=dev, dtype="bfloat16")
    ids = lambda n: prompt(n, gen.vocab_size)  # noqa: E731  (the same ids transformers gets)
    kw = dict(ignore_eos=True, do_sample=False, details=True)
    gen.generate_ids(ids(16), max_new_tokens=8, **kw)  # warm-up: kernels load, cuBLAS initializes
    decode = {n: statistics.median(gen.generate_ids(ids(n), max_new_tokens=new_tokens, **kw).decode_tokens_per_s
                                   for _ in range(3)) for n in contexts}
    texts = [" ".join(f"t{i}" for i in ids(16 + j)[:16]) for j in range(batch)]  # the word-level tokenizer
    gen.generate_batch(texts, max_new_tokens=4, ignore_eos=True)
    wall = median_time(lambda: gen.generate_batch(texts, max_new_tokens=new_tokens, ignore_eos=True), dev)
    prefill = {n: n / statistics.median(gen.generate_ids(ids(n), max_new_tokens=1, **kw).time_to_first_token
                                        for _ in range(3)) for n in lengths}
    return decode, batch * new_tokens / wall, prefill


def time_transformers(path, dev, contexts, lengths, new_tokens, batch, compiled):
    import torch
    from transformers import GraniteForCausalLM

    model = GraniteForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(dev).eval()
    vocab = model.config.vocab_size
    kw = dict(do_sample=False, pad_token_id=0)
    if compiled:
        model.generation_config.cache_implementation = "static"
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
    with torch.no_grad():
        def gen(x, n):
            return model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, **kw)

        decode = {}
        for n in contexts:
            x = torch.tensor([prompt(n, vocab)], device=dev)
            for _ in range(2 if compiled else 1):  # warm-up (compilation)
                gen(x, new_tokens)
            first = median_time(lambda: gen(x, 1), dev)
            decode[n] = (new_tokens - 1) / (median_time(lambda: gen(x, new_tokens), dev) - first)
        x = torch.tensor([prompt(16, vocab) for _ in range(batch)], device=dev)
        gen(x, 4)
        batched = batch * new_tokens / median_time(lambda: gen(x, new_tokens), dev)
        prefill = {}
        if not compiled:
            for n in lengths:
                x = torch.tensor([prompt(n, vocab)], device=dev)
                model(x)
                prefill[n] = n / median_time(lambda: model(x, logits_to_keep=1), dev)
    del model
    return decode, batched, prefill


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
    ap.add_argument("--ops", help="the op-test binary built with --features cuda (tests/kernels.rs)")
    ap.add_argument("--target", default=os.path.join(tempfile.gettempdir(), "granite-rs-site"))
    ap.add_argument("--cpu", action="store_true", help="run everything on the CPU (smoke test)")
    ap.add_argument("--small", action="store_true", help="a small model instead of the 2B shape")
    ap.add_argument("--no-compile", action="store_true", help="skip transformers with torch.compile")
    ap.add_argument("--new-tokens", type=int, default=None)
    args = ap.parse_args()
    dev = "cpu" if args.cpu else "cuda"
    contexts, lengths = ([16, 64], [64, 128]) if args.small else ([128, 2048], [512, 2048])
    new_tokens = args.new_tokens or (16 if args.small else 128)
    batch = 8

    import torch  # first: its CUDA libraries, then ours

    if dev == "cuda":
        require_cuda13(torch)
    if args.wheel:
        install(args.wheel, args.target)
    if dev == "cuda":
        preload_cuda_libs()
    import granite_rs

    print(f"granite_rs {granite_rs.__version__} from {granite_rs.__file__}; torch {torch.__version__} "
          f"(CUDA {torch.version.cuda}); device {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}",
          flush=True)
    if args.ops:
        op_tests(args.ops)
    fixture_checks(granite_rs, dev)
    feature_checks(granite_rs, dev)

    header = (f"| engine | decode tok/s after {contexts[0]} | % of bound | decode after {contexts[1]} | "
              f"batch-{batch} decode tok/s | " + " | ".join(f"prefill {n} tok/s" for n in lengths) + " |")
    rows = []
    with tempfile.TemporaryDirectory() as path:
        weight_bytes = make_checkpoint(path, args.small)
        bandwidth = copy_bandwidth(dev)
        bound = bandwidth / weight_bytes
        print(f"weights {weight_bytes / 1e9:.2f} GB, copy bandwidth {bandwidth / 1e12:.2f} TB/s, "
              f"decode bound {bound:.0f} tokens/s ({1e3 / bound:.2f} ms/token)", flush=True)
        logits_check(granite_rs, path, dev, "small model" if args.small else "2B-shaped model")

        def row(name, measured):
            decode, batched, prefill = measured
            cells = " | ".join(f"{prefill[n]:.0f}" if n in prefill else "-" for n in lengths)
            rows.append(f"| {name} | {decode[contexts[0]]:.1f} | {100 * decode[contexts[0]] / bound:.0f}% | "
                        f"{decode[contexts[1]]:.1f} | {batched:.0f} | {cells} |")
            print(rows[-1], flush=True)

        row("granite-rs", time_ours(granite_rs, path, dev, contexts, lengths, new_tokens, batch))
        row("transformers eager", time_transformers(path, dev, contexts, lengths, new_tokens, batch, compiled=False))
        if not args.no_compile:
            try:
                row("transformers static+compile",
                    time_transformers(path, dev, contexts, lengths, new_tokens, batch, compiled=True))
            except Exception as e:  # noqa: BLE001 - report and go on
                print(f"transformers with torch.compile failed: {type(e).__name__}: {e}", flush=True)

    print(f"\n{header}\n|---|---|---|---|---|" + "---|" * len(lengths))
    print("\n".join(rows))
    print(f"\nchecks: {'all passed' if not FAILED else 'FAILED: ' + ', '.join(FAILED)}")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
