#!/usr/bin/env bash
# Builds the CUDA wheel (abi3; needs an NVIDIA driver and the CUDA 13.0 runtime libraries where it
# is installed, see README "CUDA") into dist-cuda/, on a machine without CUDA or a GPU, and the
# CUDA op tests (tests/kernels.rs) as dist-cuda/kernels.gz for scripts/gpu_check.py --ops.
#   usage: bash scripts/cuda_build.sh        (CUDA_COMPUTE_CAP, default 90: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda_toolchain.sh)"
[ -x .venv/bin/maturin ] || { python3 -m venv .venv && .venv/bin/pip install -q maturin; }
# --compatibility linux: the module links libcuda/libcublas, which no manylinux policy allows.
CARGO_TARGET_DIR=target/cuda .venv/bin/maturin build --release --features python,cuda \
  --compatibility linux --out dist-cuda
bin=$(CARGO_TARGET_DIR=target/cuda cargo test --release --features cuda --test kernels --no-run \
  --message-format=json | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable"):
        print(m["executable"])' | tail -1)
gzip -c "$bin" > dist-cuda/kernels.gz   # candle embeds its PTX, which compresses well
ls -l dist-cuda
