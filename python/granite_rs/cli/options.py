"""The generation flags of ``generate`` and ``chat``, made from the engine's own list of keywords
(``GENERATION_KEYWORDS``), and the keywords a command line gives."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable, Dict, Mapping

from granite_rs._granite_rs import GENERATION_KEYWORDS

from .common import note

# Keywords the command line does not offer: they change what a call returns (a GenerationResult
# with timings and logprobs instead of text), not how the text it streams is generated.
_NOT_OFFERED = ("details", "top_logprobs")

_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")

# How the command line spells keywords beyond `--name VALUE`: short aliases, and metavars other
# than their type's. A list keyword is a repeatable flag named in the singular, one item per use.
_SHORT_FLAGS = {"max_new_tokens": "-n", "temperature": "-t"}
_METAVARS = {"temperature": "T", "top_k": "K", "top_p": "P", "min_p": "P", "seed": "S"}
_TYPE_METAVARS = {"int": "N", "float": "X", "strs": "TEXT", "ints": "ID", "str": "TEXT", "json": "FILE"}


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError as e:
        raise argparse.ArgumentTypeError(f"cannot read {path}: {e.strerror}") from None


def _read_json(path: str) -> Any:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"{path} is not JSON: {e}") from None


_CONVERTERS: Dict[str, Callable[[str], Any]] = {
    "int": int, "float": float, "strs": str, "ints": int, "str": str, "json": _read_json,
}
# Keywords whose value the command line reads from a file.
_FROM_FILE: Dict[str, Callable[[str], Any]] = {"grammar": _read_text}
_LISTS = ("strs", "ints")

_OFFERED = [keyword for keyword in GENERATION_KEYWORDS if keyword["name"] not in _NOT_OFFERED]


def _dest(keyword: Mapping[str, Any]) -> str:
    """The keyword's flag without the dashes, with underscores (``stop_token_ids``: ``stop_token_id``)."""
    name: str = keyword["name"]
    return name[:-1] if keyword["type"] in _LISTS and name.endswith("s") else name


def _help(keyword: Mapping[str, Any]) -> str:
    text: str = keyword["doc"]
    if keyword["default"] is not None:
        text += f" (default: {keyword['default']})"
    if keyword["type"] in _LISTS:
        text += "; repeatable"
    return text.replace("%", "%%")


def generation_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The keywords for generate/stream/chat: only those given, so that the model's
    generation_config.json supplies the rest (as in transformers)."""
    kw: Dict[str, Any] = {}
    for keyword in _OFFERED:
        value = getattr(args, _dest(keyword))
        if value is not None:
            kw[keyword["name"]] = list(value) if keyword["type"] in _LISTS else value
    given = [name for name in _SAMPLING_ONLY if name in kw]
    if given and args.do_sample is None:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        note(args, f"note: {flags} take effect only when sampling "
                   "(--sample, or do_sample in the model's generation_config.json)")
    return kw


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "generation options",
        "Left out, a value comes from the model's generation_config.json, else the default shown.",
    )
    for keyword in _OFFERED:
        name, kind, dest = keyword["name"], keyword["type"], _dest(keyword)
        flag = "--" + dest.replace("_", "-")
        if name == "do_sample":
            mode = g.add_mutually_exclusive_group()
            mode.add_argument("--sample", flag, dest=dest, action="store_const", const=True, help=_help(keyword))
            mode.add_argument("--greedy", dest=dest, action="store_const", const=False,
                              help="always take the most likely token, even if generation_config.json asks to sample")
        elif kind == "bool":
            g.add_argument(flag, dest=dest, action="store_const", const=True, help=_help(keyword))
        else:
            flags = (_SHORT_FLAGS[name], flag) if name in _SHORT_FLAGS else (flag,)
            convert = _FROM_FILE.get(name, _CONVERTERS[kind])
            metavar = "FILE" if name in _FROM_FILE else _METAVARS.get(name, _TYPE_METAVARS[kind])
            g.add_argument(*flags, dest=dest, action="append" if kind in _LISTS else "store",
                           type=convert, metavar=metavar, help=_help(keyword))
    g.add_argument("--stats", action="store_true", help="print token count, time to first token and speed to stderr")
