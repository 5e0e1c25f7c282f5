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

from conftest import copy_fixture, make_checkpoint, random_weights, read_safetensors, write_safetensors
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
]


@pytest.mark.parametrize(
    "spoil, cls, message", [pytest.param(*case[1:], id=case[0]) for case in LOAD_ERRORS]
)
def test_load_error(tmp_path, spoil, cls, message):
    model_dir = copy_fixture(tmp_path, GOOD)
    spoil(model_dir)
    with pytest.raises(cls, match=message):
        Generator(model_dir)


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


def test_token_id_too_large_for_int64(gen):
    with pytest.raises(OverflowError):
        gen.decode([2**70])


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
