#!/usr/bin/env bash
# Sets up the Python package and streams a generation on CPU.
# Usage: scripts/demo.sh [MODEL_DIR] [PROMPT]   (default: a tiny random-weight fixture model)
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q numpy maturin
VIRTUAL_ENV="$PWD/.venv" PATH="$PWD/.venv/bin:$PATH" maturin develop --release --quiet
exec .venv/bin/python scripts/stream.py "${1:-tests/fixtures/mha_tied}" "${2:-The quick brown fox}"
