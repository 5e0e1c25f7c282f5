"""``granite-rs info``: what the model is (as the engine read it from its files) and what the
loaded engine reports."""

from __future__ import annotations

import argparse
import json
from typing import Any, Dict, Optional

import granite_rs

from .common import FORMATTER, USER_ERRORS, add_model_options, current_rss_bytes, load_generator

EPILOG = """\
Shows what the engine read from the model's files (format, architecture, shape, stored dtype,
parameter count, the parameters one token uses, the attention and Mamba2 layers, the experts)
and what the loaded engine reports (vocab size, context length, eos ids, device, dtype, chat
template), with the load time and the process's memory after loading.

examples:
  granite-rs info
  granite-rs info -m ./granite-3.1-2b-instruct --json
"""


def add_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("info", help="show the model's architecture, size and memory",
                              description="Describe a model: architecture, parameters, vocabulary, context, memory.",
                              epilog=EPILOG, formatter_class=FORMATTER)
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    add_model_options(p, suppress=True)
    p.set_defaults(func=run)


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def run(args: argparse.Namespace) -> int:
    g, path, load_s = load_generator(args)
    try:
        g.apply_chat_template([{"role": "user", "content": "hi"}])
        chat_template = True
    except USER_ERRORS:
        chat_template = False
    info: Dict[str, Any] = {"model": str(path)}
    info.update(g.model_info)
    info.update({
        "vocab_size": g.vocab_size,
        "context_length": g.context_length,
        "eos_token_ids": list(g.eos_token_ids),
        "device": g.device,
        "dtype": g.dtype,
        "chat_template": chat_template,
        "load_s": round(load_s, 4),
        "rss_after_load_bytes": current_rss_bytes(),
        "granite_rs_version": granite_rs.__version__,
    })
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    labels = [
        ("model", "model"), ("format", "format"), ("name", "name"), ("architecture", "architecture"),
        ("model_type", "model type"), ("parameters", "parameters"),
        ("active_parameters", "active parameters"), ("num_hidden_layers", "layers"),
        ("hidden_size", "hidden size"), ("intermediate_size", "intermediate size"),
        ("num_local_experts", "experts"), ("shared_intermediate_size", "shared MLP size"),
        ("num_attention_heads", "attention heads"), ("num_key_value_heads", "key/value heads"),
        ("torch_dtype", "stored dtype"), ("trained_context_length", "trained context"),
        ("vocab_size", "vocab size"), ("context_length", "context length"), ("eos_token_ids", "eos token ids"),
        ("device", "device"), ("dtype", "compute dtype"), ("chat_template", "chat template"),
        ("load_s", "load time"), ("rss_after_load_bytes", "memory (RSS after load)"),
        ("granite_rs_version", "granite-rs"),
    ]
    width = max(len(label) for _, label in labels)
    for key, label in labels:
        if key not in info:
            continue
        value = info[key]
        if key == "parameters" or key == "active_parameters":
            value = _count(value)
        elif key == "num_hidden_layers":
            value = f"{value} ({info['attention_layers']} attention, {info['mamba_layers']} Mamba2)"
        elif key == "num_local_experts":
            value = f"{value}, {info['num_experts_per_tok']} per token"
        elif key == "load_s":
            value = f"{value:.2f} s"
        elif key == "rss_after_load_bytes":
            value = _mib(value)
        elif key == "chat_template":
            value = "yes" if value else "no"
        elif key == "eos_token_ids":
            value = ", ".join(map(str, value)) or "-"
        print(f"{label:<{width}}  {value}")
    return 0
