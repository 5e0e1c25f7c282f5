"""``granite-rs chat``: a multi-turn conversation through the model's chat template."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List

from .common import FORMATTER, PROG, USER_ERRORS, CliError, add_model_options, load_generator, one_line
from .options import add_generation_options, generation_kwargs
from .streaming import print_stats, stream_to

CHAT_HELP = """commands:
  /exit, /quit   leave (Ctrl-D too)
  /reset         forget the conversation (the system prompt stays)
  /help          this text
Ctrl-C while an answer streams stops that answer; the conversation keeps what was written."""

EPILOG = f"""\
{CHAT_HELP}

The conversation lives in one session, so each turn computes only its new tokens.
With stdin not a terminal (a pipe or file), every non-empty line is one user turn and each
answer is printed on its own line; the exit status is 1 if a turn failed.

examples:
  granite-rs chat
  granite-rs -m ./granite-3.1-2b-instruct chat --system "You are a helpful assistant." -t 0.7 --sample
  printf 'Hi!\\nWhat did I just say?\\n' | granite-rs chat -n 64
  granite-rs chat --tools tools.json --tool-choice required   # calls as JSON lines on stderr
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("chat", help="talk with the model, turn by turn",
                              description="An interactive multi-turn chat through the model's chat template.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    p.add_argument("--prompt-string", default=">>> ", metavar="TEXT",
                   help="the input prompt shown on a terminal (%(default)r)")
    p.add_argument("--tools", metavar="FILE", type=_read_tools,
                   help="a JSON list of function specs (as OpenAI and transformers write them) the template offers "
                        "the model; each tool call the model makes is printed to stderr as one JSON line")
    p.add_argument("--tool-choice", metavar="CHOICE", default=None,
                   help="auto (default), none, required (one valid call), or a function's name (one call of it)")
    add_generation_options(p)
    add_model_options(p, suppress=True)
    p.set_defaults(func=run)


def _read_tools(path: str) -> List[Any]:
    try:
        tools = json.loads(Path(path).read_text())
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {e}") from None
    if not isinstance(tools, list):
        raise argparse.ArgumentTypeError(f"{path} must hold a JSON list of function specs")
    return list(tools)


def _tool_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    if args.tools is None:
        if args.tool_choice is not None:
            raise CliError("--tool-choice needs --tools")
        return {}
    choice = args.tool_choice
    if choice is not None and choice not in ("auto", "none", "required"):
        choice = {"type": "function", "function": {"name": choice}}
    return {"tools": args.tools, "tool_choice": choice}


def run(args: argparse.Namespace) -> int:
    kw = {**generation_kwargs(args), **_tool_kwargs(args)}
    g, path, _ = load_generator(args)
    try:
        g.apply_chat_template([{"role": "user", "content": "hi"}])
    except USER_ERRORS as e:
        raise CliError(
            f"{path.name} has no usable chat template ({one_line(e)}); use `{PROG} generate` instead"
        ) from None

    interactive = sys.stdin.isatty()
    base: List[Dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(base)
    session = g.session()
    failed = False
    if interactive:
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
        if not args.quiet:
            print(f"Chatting with {path.name}. Type /help for commands; /exit or Ctrl-D quits; "
                  "Ctrl-C stops an answer.", file=sys.stderr, flush=True)
    while True:
        try:
            line = input(args.prompt_string if interactive else "")
        except EOFError:
            if interactive:
                print(file=sys.stderr)
            break
        except KeyboardInterrupt:  # at the prompt: a fresh line, as in Python's REPL
            print(file=sys.stderr)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = list(base)
            session.reset()
            if interactive:
                print("(conversation cleared)", file=sys.stderr, flush=True)
            continue
        if text in ("/help", "/?"):
            print(CHAT_HELP, file=sys.stderr, flush=True)
            continue
        messages.append({"role": "user", "content": line.rstrip("\r\n")})
        try:
            stream = session.stream_chat(messages, **kw)
            outcome = stream_to(stream, sys.stdout)
            calls = (stream.tool_calls or []) if args.tools is not None else []
            del stream
        except BrokenPipeError:
            raise
        except USER_ERRORS as e:
            messages.pop()
            failed = True
            sys.stdout.write("\n")
            sys.stdout.flush()
            hint = " (/reset starts a new conversation)" if interactive else ""
            print(f"{PROG}: error: {one_line(e)}{hint}", file=sys.stderr, flush=True)
            continue
        except KeyboardInterrupt:  # before the first chunk: drop the turn
            messages.pop()
            sys.stdout.write("\n")
            sys.stdout.flush()
            continue
        sys.stdout.write("\n")
        if interactive:
            sys.stdout.write("\n")
        sys.stdout.flush()
        if outcome.interrupted and interactive:
            print("(answer stopped)", file=sys.stderr, flush=True)
        for call in calls:
            print(json.dumps(call, ensure_ascii=False), file=sys.stderr, flush=True)
        if args.stats:
            print_stats(outcome)
        messages.append({"role": "assistant", "content": outcome.text})
    return 1 if failed and not interactive else 0
