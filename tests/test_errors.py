"""Bad inputs: each raises the documented exception class with a message that names the problem.

Loading: a missing file raises FileNotFoundError, a bad device or dtype ValueError, anything the
model directory holds that we cannot honour GraniteError. Generation: a bad argument raises
ValueError (TypeError for an unknown keyword), at the call, for generate, generate_ids and stream.
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from conftest import (
    FIXTURES_DIR,
    copy_fixture,
    make_checkpoint,
    random_weights,
    read_safetensors,
    tiny_gguf,
    write_safetensors,
)
from granite_rs import Generator, GraniteError

GOOD = "mha_tied"


# --- helpers that spoil a copy of a good model directory ------------------------------------------


def edit_json(path: Path, **changes) -> None:
    """Sets (or, with value ..., deletes) top-level keys of a JSON file."""
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is ...:
            del data[key]
        else:
            data[key] = value
    path.write_text(json.dumps(data))


def edit_config(**changes) -> Callable[[Path], None]:
    return lambda d: edit_json(d / "config.json", **changes)


def remove(name: str) -> Callable[[Path], None]:
    return lambda d: (d / name).unlink()


def write_text(name: str, text: str) -> Callable[[Path], None]:
    return lambda d: (d / name).write_text(text)


def truncate_weights(d: Path) -> None:
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def garbage_header(d: Path) -> None:
    """A header length that fits the file, followed by bytes that are not JSON."""
    path = d / "model.safetensors"
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[:8] + b"{not json!" + b"#" * (n - 10) + data[8 + n :])


def change_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(d: Path) -> None:
        weights = read_safetensors(d / "model.safetensors")
        change(weights)
        write_safetensors(d / "model.safetensors", weights)

    return apply


def shrink_q_proj(w: dict) -> None:
    # mha_tied: hidden 64, 4 heads of 16 -> q_proj (64, 64); make it (32, 64) instead.
    w["model.layers.0.self_attn.q_proj.weight"] = w["model.layers.0.self_attn.q_proj.weight"][:32]


def drop_down_proj(w: dict) -> None:
    del w["model.layers.1.mlp.down_proj.weight"]


def int_norm(w: dict) -> None:
    w["model.norm.weight"] = np.ones(64, dtype=np.int64)


def int32_q_proj(w: dict) -> None:
    w["model.layers.0.self_attn.q_proj.weight"] = np.ones((64, 64), dtype=np.int32)


def write_bytes(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda d: (d / name).write_bytes(data)


def patch_weights_header(change: Callable[[dict], None]) -> Callable[[Path], None]:
    """Edits the JSON header of model.safetensors in place; the tensor bytes stay as they were."""

    def apply(d: Path) -> None:
        path = d / "model.safetensors"
        data = path.read_bytes()
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + n])
        change(header)
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])

    return apply


def header_length(n: int) -> Callable[[Path], None]:
    """model.safetensors whose first 8 bytes claim a header of ``n`` bytes."""

    def apply(d: Path) -> None:
        path = d / "model.safetensors"
        path.write_bytes(struct.pack("<Q", n) + path.read_bytes()[8:])

    return apply


def offsets_past_end(header: dict) -> None:
    start, end = header["model.norm.weight"]["data_offsets"]
    header["model.norm.weight"]["data_offsets"] = [start + 10**9, end + 10**9]


def dtype_tag(tag: str) -> Callable[[dict], None]:
    return lambda header: header["model.norm.weight"].update(dtype=tag)


# (id, spoil the copied `mha_tied` dir, exception class, regex the message must match)
LOAD_ERRORS = [
    ("no_config", remove("config.json"), FileNotFoundError, r"not found: .*config\.json"),
    ("config_broken_json", write_text("config.json", '{"hidden_size": 64,'), GraniteError, r"config\.json: .*EOF"),
    ("config_missing_hidden_size", edit_config(hidden_size=...), GraniteError, r"hidden_size"),
    ("config_hidden_act_foo", edit_config(hidden_act="foo"), GraniteError, r"`hidden_act`: `foo` is not supported"),
    (
        "config_heads_do_not_divide_hidden",
        edit_config(num_attention_heads=5, num_key_value_heads=5),
        GraniteError,
        r"`num_attention_heads`: 5 does not divide hidden_size 64",
    ),
    (
        "config_kv_heads_do_not_divide_heads",
        edit_config(num_key_value_heads=3),
        GraniteError,
        r"`num_key_value_heads`: 3 does not divide num_attention_heads 4",
    ),
    (
        "config_rope_yarn",
        edit_config(rope_scaling={"type": "yarn", "factor": 4.0}),
        GraniteError,
        r"rope_type`: `yarn` is not supported",
    ),
    (
        "config_rope_linear_without_factor",
        edit_config(rope_scaling={"rope_type": "linear"}),
        GraniteError,
        r"rope_scaling\.factor",
    ),
    ("config_partial_rotary", edit_config(partial_rotary_factor=0.5), GraniteError, r"`partial_rotary_factor`"),
    ("config_model_type_bert", edit_config(model_type="bert"), GraniteError, r"`model_type`: `bert` is not supported"),
    # The rest of the family: checked, and its weights looked for.
    ("config_moe_without_experts", edit_config(model_type="granitemoe"), GraniteError,
     r"weight `model.layers.0.block_sparse_moe.input_linear.weight` is missing from the checkpoint"),
    ("config_hybrid_mamba_without_weights",
     edit_config(model_type="granitemoehybrid", layer_types=["mamba", "attention"]),
     GraniteError, r"weight `model.layers.0.mamba.conv1d.bias` is missing from the checkpoint"),
    ("config_moe_experts_per_token", edit_config(model_type="granitemoe", num_local_experts=4, num_experts_per_tok=5),
     GraniteError, r"`num_experts_per_tok`: must be between 1 and num_local_experts \(4\), got 5"),
    ("config_layer_types_short", edit_config(model_type="granitemoehybrid", layer_types=["attention"]), GraniteError,
     r"`layer_types`: has 1 entries for 2 layers"),
    ("config_layer_types_unknown", edit_config(model_type="granitemoehybrid", layer_types=["attention", "conv"]),
     GraniteError, r"`layer_types`: `conv` is not a layer type"),
    ("config_mamba_groups", edit_config(model_type="granitemoehybrid", mamba_n_heads=8, mamba_n_groups=3),
     GraniteError, r"`mamba_n_groups`: 3 does not divide mamba_n_heads 8"),
    ("config_position_embedding_alibi", edit_config(model_type="granitemoehybrid", position_embedding_type="alibi"),
     GraniteError, r"`position_embedding_type`: `alibi` is not supported"),
    ("config_zero_layers", edit_config(num_hidden_layers=0), GraniteError, r"`num_hidden_layers`: must be positive"),
    ("config_torch_dtype_float64", edit_config(torch_dtype="float64"), GraniteError, r"`torch_dtype`: `float64`"),
    (
        "generation_config_broken_json",
        write_text("generation_config.json", "not json"),
        GraniteError,
        r"generation_config\.json",
    ),
    ("no_tokenizer", remove("tokenizer.json"), FileNotFoundError, r"tokenizer file not found: .*tokenizer\.json"),
    (
        "tokenizer_does_not_parse",
        write_text("tokenizer.json", '{"model": 42}'),
        GraniteError,
        r"tokenizer: .*tokenizer\.json",
    ),
    ("no_weights", remove("model.safetensors"), FileNotFoundError, r"weights file not found: .*model\.safetensors"),
    ("weights_truncated", truncate_weights, GraniteError, r"model\.safetensors: not a valid safetensors file"),
    ("weights_garbage_header", garbage_header, GraniteError, r"model\.safetensors: not a valid safetensors file"),
    (
        "weight_wrong_shape",
        change_weights(shrink_q_proj),
        GraniteError,
        r"`model\.layers\.0\.self_attn\.q_proj\.weight` has shape \[32, 64\], expected \[64, 64\]",
    ),
    (
        "weight_missing",
        change_weights(drop_down_proj),
        GraniteError,
        r"`model\.layers\.1\.mlp\.down_proj\.weight` is missing",
    ),
    ("weight_not_float", change_weights(int_norm), GraniteError, r"`model\.norm\.weight` has dtype I64"),
    (
        "weight_int32",
        change_weights(int32_q_proj),
        GraniteError,
        r"`model\.layers\.0\.self_attn\.q_proj\.weight`.*I32",
    ),
    ("config_empty", write_text("config.json", ""), GraniteError, r"config\.json: EOF"),
    ("config_not_an_object", write_text("config.json", "[1, 2]"), GraniteError, r"config\.json: invalid type"),
    ("config_nan", edit_config(rms_norm_eps=math.nan), GraniteError, r"config\.json: expected value"),
    ("config_hidden_size_string", edit_config(hidden_size="64"), GraniteError, r"config\.json: invalid type: string"),
    ("config_vocab_negative", edit_config(vocab_size=-1), GraniteError, r"config\.json: invalid value: integer `-1`"),
    ("config_rms_norm_eps_negative", edit_config(rms_norm_eps=-1e-5), GraniteError, r"`rms_norm_eps`"),
    ("config_logits_scaling_zero", edit_config(logits_scaling=0.0), GraniteError, r"`logits_scaling`: must not be 0"),
    ("tokenizer_broken_json", write_text("tokenizer.json", '{"model": '), GraniteError, r"tokenizer: .*EOF"),
    ("weights_empty_file", write_bytes("model.safetensors", b""), GraniteError, r"not a valid safetensors file"),
    ("weights_header_length_huge", header_length(2**63), GraniteError, r"not a valid safetensors file"),
    ("weights_header_length_past_end", header_length(10**6), GraniteError, r"not a valid safetensors file"),
    (
        "weights_offsets_past_end",
        patch_weights_header(offsets_past_end),
        GraniteError,
        r"not a valid safetensors file",
    ),
    ("weights_unknown_dtype_tag", patch_weights_header(dtype_tag("Q9")), GraniteError, r"not a valid safetensors file"),
    (
        "weights_dtype_tag_disagrees_with_size",
        patch_weights_header(dtype_tag("F16")),
        GraniteError,
        r"not a valid safetensors file",
    ),
]


@pytest.mark.parametrize(
    "spoil, cls, message", [pytest.param(*case[1:], id=case[0]) for case in LOAD_ERRORS]
)
def test_load_error(tmp_path, spoil, cls, message):
    model_dir = copy_fixture(tmp_path, GOOD)
    spoil(model_dir)
    with pytest.raises(cls, match=message) as error:
        Generator(model_dir)
    assert "\n" not in str(error.value)  # one line, even under RUST_BACKTRACE=1
    good_model_still_works()


def good_model_still_works() -> None:
    """After a failed load the process loads and runs a good model."""
    g = Generator(FIXTURES_DIR / GOOD)
    assert len(g.generate_ids([1, 2, 3], max_new_tokens=2, ignore_eos=True)) == 2


def test_model_dir_does_not_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"model directory or .gguf file not found: .*nowhere"):
        Generator(tmp_path / "nowhere")


def test_model_dir_is_a_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"model directory or .gguf file not found"):
        Generator(path)


# --- sharded checkpoints ------------------------------------------------------------------------


def edit_index(d: Path, change: Callable[[dict], None]) -> None:
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    change(index["weight_map"])
    path.write_text(json.dumps(index))


def test_index_names_missing_shard(tmp_path):
    model_dir = copy_fixture(tmp_path, "sharded")
    edit_index(model_dir, lambda m: m.update({"model.norm.weight": "model-00009-of-00009.safetensors"}))
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*model-00009-of-00009\.safetensors"):
        Generator(model_dir)


def test_index_places_tensor_in_wrong_shard(tmp_path):
    model_dir = copy_fixture(tmp_path, "sharded")
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    actual = weight_map["model.embed_tokens.weight"]
    wrong = next(s for s in sorted(set(weight_map.values())) if s != actual)
    edit_index(model_dir, lambda m: m.update({"model.embed_tokens.weight": wrong}))
    with pytest.raises(GraniteError, match=rf"{re.escape(wrong)}: .*does not hold `model\.embed_tokens\.weight`"):
        Generator(model_dir)


def test_index_names_a_tensor_no_shard_holds(tmp_path):
    model_dir = copy_fixture(tmp_path, "sharded")
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.norm.weight"]
    edit_index(model_dir, lambda m: m.update({"model.extra.weight": shard}))
    with pytest.raises(GraniteError, match=rf"{re.escape(shard)}: .*does not hold `model\.extra\.weight`"):
        Generator(model_dir)
    good_model_still_works()


def test_index_broken_json(tmp_path):
    model_dir = copy_fixture(tmp_path, "sharded")
    (model_dir / "model.safetensors.index.json").write_text('{"weight_map": ')
    with pytest.raises(GraniteError, match=r"model\.safetensors\.index\.json"):
        Generator(model_dir)


def test_weight_shape_in_generated_checkpoint(tmp_path):
    """A config that disagrees with its weights: the error names the tensor and both shapes."""
    model_dir = make_checkpoint(tmp_path / "m")
    edit_json(model_dir / "config.json", num_key_value_heads=4)  # weights were written for 2
    message = r"`model\.layers\.0\.self_attn\.k_proj\.weight` has shape \[32, 64\], expected \[64, 64\]"
    with pytest.raises(GraniteError, match=message):
        Generator(model_dir)


def test_untied_checkpoint_without_lm_head(tmp_path):
    model_dir = make_checkpoint(tmp_path / "m", tie_word_embeddings=False)
    weights = random_weights(json.loads((model_dir / "config.json").read_text()))
    del weights["lm_head.weight"]
    write_safetensors(model_dir / "model.safetensors", weights)
    with pytest.raises(GraniteError, match=r"`lm_head\.weight` is missing"):
        Generator(model_dir)


def test_tokenizer_ids_beyond_model_vocab(tmp_path):
    """The tokenizer (384 tokens) encodes "hello" to ids the 100-token model cannot embed."""
    with pytest.raises((GraniteError, ValueError), match=r"vocab_size"):
        g = Generator(make_checkpoint(tmp_path / "m", vocab_size=100))
        g.generate("hello", max_new_tokens=1)


# --- GGUF files ---------------------------------------------------------------------------------


def truncate_file(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-100])


def not_gguf(path: Path) -> None:
    path.write_bytes(b"GGML" + path.read_bytes()[4:])


# (id, tiny_gguf keywords, then a change to the written file or None, exception class, regex)
GGUF_ERRORS = [
    (
        "unknown_tensor_type",
        dict(ggml_types={"blk.0.attn_q.weight": 99}),
        None,
        r"not a readable GGUF file: unknown dtype for tensor 99",
    ),
    ("architecture_mamba", dict(metadata={"general.architecture": "mamba"}), None, r"architecture `mamba` is not supported"),
    ("architecture_missing", dict(metadata={"general.architecture": None}), None, r"general\.architecture is missing"),
    (
        "embedding_length_missing",
        dict(metadata={"llama.embedding_length": None}),
        None,
        r"metadata `llama\.embedding_length` is missing",
    ),
    ("heads_do_not_divide_hidden", dict(metadata={"llama.attention.head_count": 3}), None, r"`num_attention_heads`"),
    ("tokenizer_t5", dict(metadata={"tokenizer.ggml.model": "t5"}), None, r"`t5` is not supported"),
    ("no_merges", dict(metadata={"tokenizer.ggml.merges": None}), None, r"tokenizer\.ggml\.merges"),
    ("bad_magic", {}, not_gguf, r"not a readable GGUF file: unknown magic"),
    ("alignment_zero", dict(metadata={"general.alignment": 0}), None, r"not a readable GGUF file: .*general\.alignment 0"),
    ("truncated", {}, truncate_file, r"tensor needs \d+ bytes"),
]


@pytest.mark.parametrize(
    "kwargs, damage, message", [pytest.param(*case[1:], id=case[0]) for case in GGUF_ERRORS]
)
def test_gguf_error(tmp_path, kwargs, damage, message):
    path = tiny_gguf(tmp_path / "tiny.gguf", **kwargs)
    if damage is not None:
        damage(path)
    with pytest.raises(GraniteError, match=message) as error:
        Generator(path)
    assert "\n" not in str(error.value)  # one line, even under RUST_BACKTRACE=1
    good_model_still_works()


def test_tiny_gguf_loads_and_generates(tmp_path):
    """The file the GGUF cases spoil is itself good."""
    g = Generator(tiny_gguf(tmp_path / "tiny.gguf"))
    assert (g.vocab_size, g.context_length) == (32, 64)
    assert len(g.generate_ids([1, 2], max_new_tokens=3, ignore_eos=True)) == 3


# --- device and dtype -----------------------------------------------------------------------------


@pytest.mark.parametrize("device", ["gpu", "tpu:0", "cuda:", "cuda:x", "cuda:-1", "CPU", ""])
def test_bad_device(fixtures_dir, device):
    with pytest.raises(ValueError, match=rf'device must be "cpu", "cuda" or "cuda:N", got "{re.escape(device)}"'):
        Generator(fixtures_dir / GOOD, device=device)


@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
def test_cuda_on_cpu_build(fixtures_dir, device):
    try:
        Generator(fixtures_dir / GOOD, device=device)
    except GraniteError as e:
        assert "no CUDA support" in str(e)
    else:
        pytest.skip("this build has CUDA support")


@pytest.mark.parametrize("dtype", ["float64", "int8", "fp8", "", "Float32"])
def test_bad_dtype(fixtures_dir, dtype):
    with pytest.raises(ValueError, match=rf"dtype must be float32, bfloat16 or float16, got \"{dtype}\""):
        Generator(fixtures_dir / GOOD, dtype=dtype)


def test_unknown_constructor_keyword(fixtures_dir):
    with pytest.raises(TypeError, match=r"precision"):
        Generator(fixtures_dir / GOOD, precision="float32")


# --- generation arguments -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gen(fixtures_dir) -> Generator:
    return Generator(fixtures_dir / GOOD)


def call(gen: Generator, method: str, **kwargs):
    """Calls generate / generate_ids / stream with a one-word prompt; stream is not iterated."""
    if method == "generate_ids":
        return gen.generate_ids(gen.encode("hello"), **kwargs)
    return getattr(gen, method)("hello", **kwargs)


METHODS = ["generate", "generate_ids", "stream"]

# (kwargs, exception class, regex). With stream, pytest.raises covers the call only, never next():
# argument errors must come at once.
BAD_KWARGS = [
    ({"max_new_tokens": 0}, ValueError, r"max_new_tokens must be at least 1, got 0"),
    ({"max_new_tokens": -1}, ValueError, r"max_new_tokens must be at least 1, got -1"),
    ({"temperature": -1.0}, ValueError, r"temperature must be a positive number, got -1"),
    ({"temperature": math.nan}, ValueError, r"temperature must be a positive number, got NaN"),
    ({"temperature": math.inf, "do_sample": True}, ValueError, r"temperature must be a positive number, got inf"),
    ({"temperature": 0.0, "do_sample": True}, ValueError, r"temperature must be a positive number, got 0"),
    ({"top_p": 0.0}, ValueError, r"top_p must be in \(0, 1\], got 0"),
    ({"top_p": 1.5}, ValueError, r"top_p must be in \(0, 1\], got 1.5"),
    ({"top_p": math.nan}, ValueError, r"top_p must be in \(0, 1\], got NaN"),
    ({"top_k": -1}, ValueError, r"top_k must not be negative, got -1"),
    ({"repetition_penalty": 0.0}, ValueError, r"repetition_penalty must be a positive number, got 0"),
    ({"repetition_penalty": -1.2}, ValueError, r"repetition_penalty must be a positive number, got -1.2"),
    ({"repetition_penalty": math.nan}, ValueError, r"repetition_penalty must be a positive number, got NaN"),
    ({"seed": -1}, ValueError, r"seed must not be negative, got -1"),
    ({"stop": ""}, ValueError, r"stop strings must not be empty"),
    ({"stop": ["\n", ""]}, ValueError, r"stop strings must not be empty"),
    ({"stop_token_ids": [384]}, ValueError, r"token id 384 is out of range for vocab_size 384"),
    ({"stop_token_ids": [-1]}, ValueError, r"token id -1 is out of range"),
    ({"top_p": math.inf}, ValueError, r"top_p must be in \(0, 1\], got inf"),
    ({"top_p": -0.5}, ValueError, r"top_p must be in \(0, 1\], got -0.5"),
    ({"min_p": math.nan}, ValueError, r"min_p must be in \[0, 1\], got NaN"),
    ({"min_p": 1.5}, ValueError, r"min_p must be in \[0, 1\], got 1.5"),
    ({"presence_penalty": math.nan}, ValueError, r"presence_penalty must be in \[-2, 2\], got NaN"),
    ({"presence_penalty": 3.0}, ValueError, r"presence_penalty must be in \[-2, 2\], got 3"),
    ({"frequency_penalty": -math.inf}, ValueError, r"frequency_penalty must be in \[-2, 2\], got -inf"),
    ({"repetition_penalty": math.inf}, ValueError, r"repetition_penalty must be a positive number, got inf"),
    ({"top_logprobs": -1}, ValueError, r"top_logprobs must not be negative, got -1"),
    ({"top_k": 2**64}, ValueError, r"top_k must be below 2\*\*64"),
    ({"max_new_tokens": 2**64}, OverflowError, r"max_new_tokens"),
    ({"temperature": 10**400}, OverflowError, r"temperature"),
    ({"max_tokens": 5}, TypeError, r"unexpected keyword argument 'max_tokens'"),
    ({"temperture": 0.5}, TypeError, r"unexpected keyword argument 'temperture'"),
]


def kwargs_id(kwargs: dict) -> str:
    return ",".join(f"{k}={v!r}" for k, v in kwargs.items())


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize(
    "kwargs, cls, message", [pytest.param(*case, id=kwargs_id(case[0])) for case in BAD_KWARGS]
)
def test_bad_generation_argument(gen, method, kwargs, cls, message):
    with pytest.raises(cls, match=message):
        call(gen, method, **kwargs)


WRONG_TYPES = [
    {"temperature": "hot"},
    {"temperature": None},
    {"max_new_tokens": 2.0},
    {"top_k": 2.5},
    {"do_sample": "yes"},
    {"stop": 5},
    {"stop_token_ids": ["a"]},
    {"top_k": math.nan},
    {"seed": 1.5},
    {"details": "yes"},
    {"stop": [None]},
]


@pytest.mark.parametrize("kwargs", WRONG_TYPES, ids=kwargs_id)
@pytest.mark.parametrize("method", METHODS)
def test_wrong_type_keyword_is_type_error(gen, method, kwargs):
    with pytest.raises(TypeError):
        call(gen, method, **kwargs)


@pytest.mark.parametrize("kwargs", WRONG_TYPES, ids=kwargs_id)
def test_wrong_type_keyword_is_named(gen, kwargs):
    (name,) = kwargs
    with pytest.raises(TypeError, match=re.escape(name)):
        gen.generate("hello", **kwargs)


@pytest.mark.parametrize("method", METHODS)
def test_empty_prompt(gen, method):
    with pytest.raises(ValueError, match=r"the prompt is empty"):
        if method == "generate_ids":
            gen.generate_ids([])
        else:
            getattr(gen, method)("")


@pytest.mark.parametrize("bad_id", [384, 10**6, -1, -(2**40)])
@pytest.mark.parametrize("method", ["generate_ids", "decode", "logits"])
def test_token_id_out_of_range(gen, method, bad_id):
    assert gen.vocab_size == 384
    with pytest.raises(ValueError, match=rf"token id {bad_id} is out of range for vocab_size 384"):
        getattr(gen, method)([1, 2, bad_id, 3])


@pytest.mark.parametrize("method", ["generate_ids", "decode", "logits"])
def test_token_id_too_large_for_int64(gen, method):
    with pytest.raises(OverflowError):
        getattr(gen, method)([1, 2**70])


@pytest.mark.parametrize("ids", [[1.5], ["a"], [None], "abc", None])
@pytest.mark.parametrize("method", ["generate_ids", "decode", "logits"])
def test_ids_of_the_wrong_type(gen, method, ids):
    with pytest.raises(TypeError):
        getattr(gen, method)(ids)


def test_max_new_tokens_zero_raises(gen):
    """max_new_tokens=0 is refused (ValueError) rather than returning nothing: every call
    produces at least one token."""
    for method in METHODS:
        with pytest.raises(ValueError, match=r"max_new_tokens must be at least 1, got 0"):
            call(gen, method, max_new_tokens=0)
    assert len(gen.generate_ids([1, 2], max_new_tokens=1)) == 1


def test_logits_of_no_ids(gen):
    with pytest.raises(ValueError, match=r"ids is empty"):
        gen.logits([])


@pytest.mark.parametrize("extra", [0, 1, 72])
@pytest.mark.parametrize("method", ["generate", "generate_ids", "stream"])
def test_prompt_longer_than_context(gen, method, extra):
    """A prompt that leaves no room for a new token: the message gives both lengths."""
    limit = gen.context_length
    assert limit == 128
    ids = [5] * (limit + extra)
    with pytest.raises(ValueError, match=rf"the prompt has {limit + extra} tokens but the context holds {limit}"):
        if method == "generate_ids":
            gen.generate_ids(ids)
        else:
            text = gen.decode(ids)
            assert len(gen.encode(text)) == limit + extra
            getattr(gen, method)(text)


def test_logits_longer_than_context(gen):
    n = gen.context_length + 1
    with pytest.raises(ValueError, match=rf"the prompt has {n} tokens but the context holds {n - 1}"):
        gen.logits([5] * n)


def test_stream_is_not_started_by_a_bad_call(gen):
    """A failed stream(...) call leaves nothing behind; the next good one works."""
    with pytest.raises(ValueError):
        gen.stream("hello", top_p=2.0)
    stream = gen.stream("hello", max_new_tokens=3)
    assert stream.finish_reason is None
    assert "".join(stream) == gen.generate("hello", max_new_tokens=3)
    assert stream.finish_reason in ("eos", "length")


# --- and afterwards, good inputs still work -------------------------------------------------------


def test_good_fixture_still_loads_and_generates(fixtures_dir, gen):
    for g in (gen, Generator(fixtures_dir / GOOD)):
        ids = g.generate_ids(g.encode("hello"), max_new_tokens=4, ignore_eos=True)
        assert len(ids) == 4 and all(0 <= i < g.vocab_size for i in ids)
        assert g.generate("hello", max_new_tokens=4, ignore_eos=True) == g.decode(ids)
        assert g.logits([1, 2, 3]).shape == (3, g.vocab_size)
        assert np.isfinite(g.logits([1, 2, 3])).all()


def test_generated_checkpoint_loads_and_generates(tmp_path):
    g = Generator(make_checkpoint(tmp_path / "m"))
    assert (g.vocab_size, g.context_length) == (384, 128)
    assert len(g.generate_ids([1, 2, 3], max_new_tokens=5, ignore_eos=True)) == 5


@pytest.mark.parametrize(
    "changes, field",
    [(dict(max_new_tokens=0), "max_new_tokens"), (dict(do_sample=True, temperature=-1.0), "temperature")],
)
def test_bad_generation_config_fails_at_load(tmp_path, changes, field):
    model_dir = copy_fixture(tmp_path, GOOD)
    edit_json(model_dir / "generation_config.json", **changes)
    with pytest.raises(GraniteError, match=rf"generation_config\.json.*{field}"):
        Generator(model_dir)


def test_seed_takes_the_whole_u64_range(gen):
    for seed in (0, 2**63, 2**64 - 1):
        assert len(gen.generate_ids([5, 6], max_new_tokens=3, do_sample=True, seed=seed, ignore_eos=True)) == 3
    with pytest.raises(ValueError, match=r"seed must be below 2\*\*64"):
        gen.generate_ids([5, 6], do_sample=True, seed=2**64)


# --- numerical guards -----------------------------------------------------------------------------


def overflowing_checkpoint(directory: Path) -> Path:
    """Weights that are fine in float32 but whose logits (about 1e6) overflow float16's 65504."""
    model_dir = make_checkpoint(directory, tie_word_embeddings=False)
    weights = read_safetensors(model_dir / "model.safetensors")
    weights["model.norm.weight"] *= 1000
    weights["lm_head.weight"] *= 1000
    write_safetensors(model_dir / "model.safetensors", weights)
    return model_dir


FLOAT16_OVERFLOW = r'the logits overflowed in float16 \((infinite|NaN) values\); use dtype="float32" or "bfloat16"'


def every_use(g: Generator) -> list[Callable[[], object]]:
    return [
        lambda: g.generate("hello", max_new_tokens=2),
        lambda: g.generate("hello", max_new_tokens=2, details=True),
        lambda: g.generate_ids([1, 2], max_new_tokens=2, do_sample=True, seed=0),
        lambda: list(g.stream("hello", max_new_tokens=2)),
        lambda: g.generate_batch(["hello", "a longer prompt"], max_new_tokens=2),
        lambda: g.session().generate_ids([1, 2], max_new_tokens=2),
        lambda: g.logits([1, 2, 3]),
    ]


def test_float16_overflow_is_a_clear_error(tmp_path):
    model_dir = overflowing_checkpoint(tmp_path / "m")
    for dtype in ("float32", "bfloat16"):
        g = Generator(model_dir, dtype=dtype)
        assert np.isfinite(g.logits([1, 2, 3])).all()
        for use in every_use(g):
            use()
    g = Generator(model_dir, dtype="float16")
    for use in every_use(g):
        with pytest.raises(GraniteError, match=FLOAT16_OVERFLOW):
            use()


def test_nan_weights_are_a_clear_error(tmp_path):
    model_dir = make_checkpoint(tmp_path / "m")
    weights = read_safetensors(model_dir / "model.safetensors")
    weights["model.layers.0.mlp.down_proj.weight"][0, 0] = np.nan
    write_safetensors(model_dir / "model.safetensors", weights)
    g = Generator(model_dir)
    for use in every_use(g):
        with pytest.raises(GraniteError, match=r"numerical error: the model produced NaN logits$"):
            use()
    good_model_still_works()
