"""Stream a generation to stdout: python scripts/stream.py MODEL_DIR PROMPT"""

import sys
import time

from granite_rs import Generator

model_dir, prompt = sys.argv[1], sys.argv[2]
g = Generator(model_dir)
print(f"{g!r}\n{prompt}", end="", flush=True)
start = time.perf_counter()
stream = g.stream(prompt, max_new_tokens=64)
for chunk in stream:
    print(chunk, end="", flush=True)
elapsed = time.perf_counter() - start
n = len(stream.token_ids)
print(f"\n[{n} tokens in {elapsed:.2f}s, {n / elapsed:.0f} tokens/s, finish: {stream.finish_reason}]")
