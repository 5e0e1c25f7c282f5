"""``granite-rs generate``: continue a prompt, streaming the text to stdout."""

from __future__ import annotations

import argparse
import sys

from .common import FORMATTER, USER_ERRORS, CliError, add_model_options, load_generator, one_line
from .options import add_generation_options, generation_kwargs
from .streaming import print_stats, stream_to

EPILOG = """\
The prompt is PROMPT, or stdin when PROMPT is left out or is "-" (one trailing newline is
dropped). The text streams to stdout as it is generated, followed by a newline (-N: none).
Greedy unless --sample. Ctrl-C stops the generation.

examples:
  granite-rs generate "Once upon a time" -n 50
  granite-rs generate "Once upon a time" --sample -t 0.8 --top-p 0.95 --seed 42
  granite-rs generate --chat --system "Answer in French." "What is the capital of Italy?"
  cat prompt.txt | granite-rs -m ./model generate --stop "###" --stats
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("generate", aliases=["gen"], help="continue a prompt, streaming the text",
                              description="Generate text after a prompt, streamed to stdout.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt")
    p.add_argument("-N", "--no-newline", action="store_true", help="do not print a newline after the text")
    add_generation_options(p)
    add_model_options(p, suppress=True)
    p.set_defaults(func=run)


def read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None and args.prompt != "-":
        prompt = args.prompt
    else:
        if args.prompt is None and sys.stdin.isatty():
            raise CliError("no prompt: pass PROMPT, or pipe it on stdin (e.g. `echo Hello | granite-rs generate`)", 2)
        prompt = sys.stdin.read()
        if prompt.endswith("\n"):  # the newline that `echo` and editors add
            prompt = prompt[:-1]
            if prompt.endswith("\r"):
                prompt = prompt[:-1]
    if not prompt:
        raise CliError("the prompt is empty", 2)
    return prompt


def run(args: argparse.Namespace) -> int:
    prompt = read_prompt(args)
    kw = generation_kwargs(args)
    g, _, _ = load_generator(args)
    try:
        if args.chat:
            messages = []
            if args.system:
                messages.append({"role": "system", "content": args.system})
            messages.append({"role": "user", "content": prompt})
            stream = g.stream_chat(messages, **kw)
        else:
            if args.system:
                raise CliError("--system needs --chat", 2)
            stream = g.stream(prompt, **kw)
        outcome = stream_to(stream, sys.stdout)
    except (CliError, BrokenPipeError):
        raise
    except USER_ERRORS as e:
        raise CliError(one_line(e)) from None
    if not args.no_newline:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print_stats(outcome)
    return 130 if outcome.interrupted else 0
