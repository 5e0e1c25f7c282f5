"""The Python API against the HF transformers reference fixtures (tests/fixtures)."""

import json
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pytest

import granite_rs
from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["mha_tied", "gqa_untied", "mqa_bias", "rope_linear", "rope_dynamic", "bf16", "sharded", "llama_like"]
DTYPES = {"F32": np.float32, "I64": np.int64}


def read_reference(case: str) -> dict:
    """reference.safetensors, read with numpy alone."""
    data = (FIXTURES / case / "reference.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        start, end = info["data_offsets"]
        raw = data[8 + n + start : 8 + n + end]
        out[name] = np.frombuffer(raw, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])
    return out


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FIXTURES / "mha_tied")


@pytest.mark.parametrize("case", CASES)
def test_logits_and_greedy_tokens_match_transformers(case):
    ref = read_reference(case)
    exact, g = Generator(FIXTURES / case, matmul_precision="exact"), Generator(FIXTURES / case)
    ids = ref["input_ids"].tolist()
    logits = exact.logits(ids)
    assert logits.dtype == np.float32 and logits.shape == (len(ids), g.vocab_size)
    assert np.abs(logits - ref["logits"]).max() <= 1e-4 * np.abs(ref["logits"]).max()
    # The default rounds a bf16 model's prompt activations to bf16 where the CPU multiplies bf16.
    assert np.abs(g.logits(ids) - ref["logits"]).max() <= 1e-2 * np.abs(ref["logits"]).max()
    for model in (exact, g):
        assert model.generate_ids(ids, max_new_tokens=32, ignore_eos=True) == ref["greedy_ids"].tolist()


def test_dynamic_rope_is_bounded_by_the_kv_cache_only():
    """Dynamic scaling rescales its frequencies to any length, as transformers does: the fixture's
    prompt (147 tokens) is past max_position_embeddings x factor (128), and the KV cache budget is
    the limit."""
    ref = read_reference("rope_dynamic")
    ids = ref["input_ids"].tolist()
    assert len(ids) > 32 * 4
    per_block = 16 * 2 * 2 * 2 * 16 * 4  # positions x (k, v) x layers x kv heads x head_dim x f32
    small = Generator(FIXTURES / "rope_dynamic", kv_cache_bytes=8 * per_block)
    assert small.context_length == small.model_info["kv_cache_positions"] == 128
    with pytest.raises(ValueError, match=r"the prompt has 147 tokens but the context holds 128"):
        small.generate_ids(ids)
    g = Generator(FIXTURES / "rope_dynamic", kv_cache_bytes=16 * per_block)
    assert g.context_length == 256
    assert g.generate_ids(ids, max_new_tokens=32, ignore_eos=True) == ref["greedy_ids"].tolist()


def test_generate_is_the_decoded_greedy_ids(gen):
    prompt = "The quick brown fox"
    ids = gen.generate_ids(gen.encode(prompt), max_new_tokens=40, ignore_eos=True)
    assert gen.generate(prompt, max_new_tokens=40, ignore_eos=True) == gen.decode(ids)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(max_new_tokens=60, ignore_eos=True),
        dict(max_new_tokens=60, do_sample=True, seed=3, temperature=1.3, top_k=50, top_p=0.95),
        dict(max_new_tokens=60, do_sample=True, seed=4, repetition_penalty=1.5),
    ],
)
def test_stream_joins_to_generate(kwargs):
    g = Generator(FIXTURES / "gqa_untied")
    prompt = "你好 🦊 def main():"
    chunks = list(g.stream(prompt, **kwargs))
    assert "".join(chunks) == g.generate(prompt, **kwargs)
    assert all(chunks)  # (a random model emits invalid UTF-8 too, so U+FFFD may appear)


def test_stream_reports_tokens_and_finish_reason(gen):
    s = gen.stream("The quick", max_new_tokens=5, ignore_eos=True)
    assert s.finish_reason is None
    text = "".join(s)
    assert s.finish_reason == "length" and len(s.token_ids) == 5
    assert text == gen.decode(s.token_ids)


def test_seed_reproduces_a_sample_and_other_seeds_differ(gen):
    kw = dict(max_new_tokens=30, do_sample=True, temperature=1.5, ignore_eos=True)
    first = gen.generate_ids([5, 6, 7], seed=11, **kw)
    assert gen.generate_ids([5, 6, 7], seed=11, **kw) == first
    assert any(gen.generate_ids([5, 6, 7], seed=s, **kw) != first for s in range(12, 16))


def test_stop_string_spanning_tokens_ends_the_text_before_it(gen):
    full = gen.generate("The quick", max_new_tokens=40, ignore_eos=True)
    stop = full[10:16]
    assert len(gen.encode(stop, add_special_tokens=False)) > 1
    expected = full[: full.index(stop)]
    assert gen.generate("The quick", max_new_tokens=40, ignore_eos=True, stop=stop) == expected
    s = gen.stream("The quick", max_new_tokens=40, ignore_eos=True, stop=[stop, "never seen"])
    assert "".join(s) == expected and s.finish_reason == "stop"


def test_eos_ends_generation_unless_ignored():
    g = Generator(FIXTURES / "mqa_bias")  # eos_token_id [0, 1]
    ref = read_reference("mqa_bias")
    ids = ref["input_ids"].tolist()
    greedy = ref["greedy_ids"].tolist()
    assert g.eos_token_ids == [0, 1]
    # Make the first greedy token an end-of-sequence token.
    s = g.generate_ids(ids, max_new_tokens=32, stop_token_ids=[greedy[0]])
    assert s == greedy[:1]
    assert g.generate_ids(ids, max_new_tokens=32, ignore_eos=True) == greedy


def test_max_new_tokens_and_context_limit(gen):
    assert len(gen.generate_ids([1, 2, 3], max_new_tokens=7, ignore_eos=True)) == 7
    limit = gen.context_length
    prompt = [5] * (limit - 4)
    assert len(gen.generate_ids(prompt, max_new_tokens=100, ignore_eos=True)) == 4


def test_breaking_out_of_a_stream_stops_the_work(gen):
    s = gen.stream("The quick", max_new_tokens=100, ignore_eos=True)
    next(s)
    produced = len(s.token_ids)
    del s  # nothing runs in the background
    assert produced < 100


def test_the_gil_is_released_while_generating(tmp_path):
    from conftest import make_checkpoint

    model_dir = tmp_path / "slow"
    make_checkpoint(model_dir, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, max_position_embeddings=4096)
    g = Generator(model_dir)
    worker = threading.Thread(target=g.generate_ids, args=([1, 2, 3],), kwargs=dict(max_new_tokens=1500, ignore_eos=True))
    ticks = []
    start = time.perf_counter()
    worker.start()
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    elapsed = time.perf_counter() - start
    gaps = np.diff([start, *ticks])
    # With the GIL held for the whole call this thread would not run until it returned.
    assert elapsed > 0.2 and len(ticks) > 20 and gaps.max() < elapsed / 4, (elapsed, len(ticks), gaps.max())


def test_version_and_exports():
    assert granite_rs.__version__ and set(granite_rs.__all__) >= {"Generator", "GraniteError", "TextStream"}
    assert issubclass(granite_rs.GraniteError, Exception)


def test_long_generation_past_the_initial_cache_matches_one_full_forward(tmp_path):
    from conftest import make_checkpoint

    g = Generator(make_checkpoint(tmp_path / "long", max_position_embeddings=2048))
    prompt = [5, 6, 7]
    new = g.generate_ids(prompt, max_new_tokens=1100, ignore_eos=True)  # the cache grows past 1027
    assert len(new) == 1100
    greedy_again = g.logits(prompt + new[:-1]).argmax(axis=-1)[len(prompt) - 1 :]
    assert greedy_again.tolist() == new


def test_generate_ids_with_details(gen):
    ids = gen.encode("The quick brown fox")
    plain = gen.generate_ids(ids, max_new_tokens=6, ignore_eos=True)
    r = gen.generate_ids(ids, max_new_tokens=6, ignore_eos=True, details=True)
    assert isinstance(r, granite_rs.GenerationResult)
    assert r.token_ids == plain and r.prompt_tokens == len(ids) and r.finish_reason == "length"
    assert r.text == gen.decode(plain)


def test_bf16_checkpoint_is_read_in_place(tmp_path):
    """bfloat16 weights computed in float32 straight from the mapped file give the logits of the
    same values stored as float32; converting them to the compute dtype (quantize="none") too."""
    from conftest import make_checkpoint, read_safetensors, write_safetensors

    kw = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    half_dir = make_checkpoint(tmp_path / "bf16", torch_dtype="bfloat16", **kw)
    full_dir = make_checkpoint(tmp_path / "f32", **kw)
    write_safetensors(full_dir / "model.safetensors", read_safetensors(half_dir / "model.safetensors"))
    half, full = Generator(half_dir, matmul_precision="exact"), Generator(full_dir)
    converted = Generator(half_dir, quantize="none")
    assert set(half.weight_types) == {"bf16"} and half.mapped_weight_bytes == half.weight_bytes
    assert set(converted.weight_types) == {"f32"} and converted.mapped_weight_bytes == 0
    assert half.weight_bytes * 2 == full.weight_bytes == full.mapped_weight_bytes
    ids = full.encode("The quick brown fox jumps over the lazy dog")
    want = full.logits(ids)
    for g in (half, converted):
        assert np.abs(g.logits(ids) - want).max() < 1e-5 * np.abs(want).max()
    assert half.generate_ids(ids, max_new_tokens=8) == full.generate_ids(ids, max_new_tokens=8)
    # The default, "fast": where the CPU multiplies bf16 the prompt's activations are rounded to
    # bf16 (a relative error of 2^-9 each), elsewhere it is "exact".
    fast = Generator(half_dir)
    assert np.abs(fast.logits(ids) - want).max() < 2e-2 * np.abs(want).max()
    # "int8" changes only GGUF block weights: a bf16 model is as "fast".
    int8 = Generator(half_dir, matmul_precision="int8")
    assert np.array_equal(int8.logits(ids), fast.logits(ids))
    with pytest.raises(ValueError, match="matmul_precision must be one of"):
        Generator(half_dir, matmul_precision="int4")


def test_quantize_and_weight_types(tmp_path):
    from conftest import make_checkpoint

    d = make_checkpoint(tmp_path / "m", hidden_size=128, intermediate_size=256, num_hidden_layers=2)
    dense, q8, half = Generator(d), Generator(d, quantize="q8_0"), Generator(d, quantize="bf16")
    assert set(dense.weight_types) == {"f32"} and set(q8.weight_types) == {"q8_0"}
    assert set(half.weight_types) == {"bf16"} and half.weight_bytes * 2 == dense.weight_bytes
    assert q8.weight_bytes < dense.weight_bytes / 3
    # As stored, float32 matrices are used in place from the mapped file; converted ones are not.
    assert dense.mapped_weight_bytes == dense.weight_bytes and q8.mapped_weight_bytes == half.mapped_weight_bytes == 0
    ids = dense.encode("The quick brown fox")
    # Q8_0 weights, computed exactly from their values: close logits, the same greedy start.
    a, b = dense.logits(ids), q8.logits(ids)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).max()
    assert np.abs(a - half.logits(ids)).max() < 0.02 * np.abs(a).max()
    assert dense.num_threads == q8.num_threads >= 1
    with pytest.raises(ValueError, match="quantize must be"):
        Generator(d, quantize="q3")
    with pytest.raises(ValueError, match="num_threads"):
        Generator(d, num_threads=dense.num_threads + 1)
