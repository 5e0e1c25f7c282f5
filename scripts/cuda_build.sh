#!/usr/bin/env bash
# Builds the CUDA wheel (abi3; needs an NVIDIA driver and the CUDA 13.0 runtime libraries where it
# is installed, see README "CUDA") into dist-cuda/, on a machine without CUDA or a GPU.
#   usage: bash scripts/cuda_build.sh        (CUDA_COMPUTE_CAP, default 90: H100/H200)
set -euo pipefail
cd "$(dirname "$0")/.."
eval "$(bash scripts/cuda_toolchain.sh)"
[ -x .venv/bin/maturin ] || { python3 -m venv .venv && .venv/bin/pip install -q maturin; }
# --compatibility linux: the module links libcuda/libcublas, which no manylinux policy allows.
CARGO_TARGET_DIR=target/cuda .venv/bin/maturin build --release --features python,cuda \
  --compatibility linux --out dist-cuda
ls -l dist-cuda
