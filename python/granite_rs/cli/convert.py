"""``granite-rs convert``: a GGUF file to an HF model directory."""

from __future__ import annotations

import argparse
from pathlib import Path

from granite_rs._granite_rs import convert_gguf

from .common import FORMATTER, USER_ERRORS, CliError, Progress, one_line

EPILOG = """\
Converts a GGUF file into an HF model directory (config.json, tokenizer.json,
model.safetensors) that --model can load.

example:
  granite-rs convert SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("convert", help="convert a GGUF file to an HF model directory",
                              description="Convert a GGUF file to an HF model directory.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("src", metavar="SRC", help="the .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress line on stderr")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    src = Path(args.src).expanduser()
    if not src.is_file():
        raise CliError(f"not a file: {args.src} (convert takes a .gguf file)")
    try:
        with Progress(f"converting {src.name}", enabled=not args.quiet):
            convert_gguf(str(src), str(Path(args.out_dir).expanduser()))
    except USER_ERRORS as e:
        raise CliError(f"cannot convert {src}: {one_line(e)}") from None
    print(f"wrote {args.out_dir}")
    return 0
