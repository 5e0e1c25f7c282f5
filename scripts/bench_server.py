"""The server's cost per streamed token, two ways, on the embedded model (SmolLM2 Q4_1):

- wall: the same greedy completion of --tokens tokens (ignore_eos) streamed by `Generator.stream`
  in this process and by a `granite-rs serve` process, read over a plain HTTP connection that
  only splits the server-sent events (no JSON parsing, so the client takes little CPU from the
  server); alternating, medians of --reps. The difference per token, against a direct step.
- CPU: what the server process's threads other than the model's (the scheduler thread and the
  compute pool it started) ran per streamed token, from /proc/PID/task/*/schedstat: the event
  loop, uvicorn, starlette, the executor thread that waits for each chunk. On a machine whose
  cores all compute, that is time taken from the forward.

    python scripts/bench_server.py [--model PATH] [--quantize q8_0] [--tokens 256] [--reps 5]

Needs granite-rs[serve] and the embedded model (the default --model). Prints the CPU's model name.
"""

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_batch import cpu_name  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from conftest import _find_real_model  # noqa: E402

from granite_rs import Generator  # noqa: E402

PROMPT = "Tell me a story."
# The model's threads: the scheduler's, and the compute pool's, which it starts and which take its name.
MODEL_THREADS = "granite-rs sche"


def thread_ns(pid: int) -> dict[str, int]:
    """Nanoseconds each thread of `pid` has run, summed by kind: the model's and the others."""
    out = {"model": 0, "other": 0}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that ended meanwhile
        out["model" if name.startswith(MODEL_THREADS) else "other"] += ns
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", type=Path)
    parser.add_argument("--quantize")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    model = args.model or _find_real_model()[0]
    quantize = ["--quantize", args.quantize] if args.quantize else []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "granite_rs", "serve", "-m", str(model), "--port", str(port), "-q",
                             *quantize])
    try:
        for _ in range(3000):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health")
                break
            except OSError:
                time.sleep(0.1)
        g = Generator(model, quantize=args.quantize)
        n = args.tokens
        kw = dict(max_new_tokens=n, ignore_eos=True, do_sample=False)
        body = json.dumps({"model": "granite", "prompt": PROMPT, "max_tokens": n, "temperature": 0,
                           "stream": True, "ignore_eos": True})

        def direct() -> tuple[float, float]:
            t = time.perf_counter()
            first = None
            for _ in g.stream(PROMPT, **kw):
                first = first or time.perf_counter()
            return first - t, time.perf_counter() - first

        def served() -> tuple[float, float]:
            conn = http.client.HTTPConnection("127.0.0.1", port)
            t = time.perf_counter()
            conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            first, events = None, 0
            for line in response:
                if line.startswith(b"data: {"):
                    events += 1
                    first = first or time.perf_counter()
            conn.close()
            return first - t, time.perf_counter() - first

        direct(), served()
        runs: dict[str, list[tuple[float, float]]] = {"direct": [], "served": []}
        cpu = {"model": 0, "other": 0}
        for _ in range(args.reps):
            runs["direct"].append(direct())
            before = thread_ns(proc.pid)
            runs["served"].append(served())
            after = thread_ns(proc.pid)
            for k in cpu:
                cpu[k] += after[k] - before[k]
        ttft = {k: statistics.median(r[0] for r in v) for k, v in runs.items()}
        decode = {k: statistics.median(r[1] for r in v) for k, v in runs.items()}
        step = decode["direct"] / (n - 1)
        extra = (decode["served"] - decode["direct"]) / (n - 1)
        other = cpu["other"] / 1e9 / (args.reps * n)
        print(f"model: {model.name}{f' quantize={args.quantize}' if args.quantize else ''}; CPU: {cpu_name()}; {n} tokens, medians of {args.reps}")
        print(f"  direct: decode step {step * 1e3:.2f} ms ({1 / step:.1f} tok/s), ttft {ttft['direct'] * 1e3:.1f} ms")
        print(f"  served: decode step {decode['served'] / (n - 1) * 1e3:.2f} ms, ttft {ttft['served'] * 1e3:.1f} ms")
        print(f"  wall: {extra * 1e3:+.3f} ms per streamed token = {extra / step:+.1%} of a step")
        print(f"  CPU of the server's other threads: {other * 1e3:.3f} ms per streamed token = {other / step:.1%} "
              f"of a step (the model's threads: {cpu['model'] / 1e9 / (args.reps * n) * 1e3:.2f} ms)")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
