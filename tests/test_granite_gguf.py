"""GGUFs (`granite`, `granitemoe`, `granitehybrid`) from llama.cpp's convert_hf_to_gguf.py (tests/fixtures/granite_gguf, made by
scripts/make_granite_gguf.py) against the HF fixtures they were converted from."""

from pathlib import Path

import numpy as np
import pytest

from conftest import read_safetensors
from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
CASES = ["mha_tied", "gqa_untied", "moe", "moe_shared", "hybrid_dense", "hybrid_moe"]


@pytest.mark.parametrize("case", CASES)
def test_gguf_matches_transformers_and_the_hf_directory(case):
    ref = read_safetensors(FIXTURES / case / "reference.safetensors")
    g, hf = Generator(FIXTURES / "granite_gguf" / f"{case}.gguf"), Generator(FIXTURES / case)
    ids = ref["input_ids"].tolist()
    logits = g.logits(ids)
    assert np.abs(logits - ref["logits"]).max() <= 1e-4 * np.abs(ref["logits"]).max()
    assert g.generate_ids(ids, max_new_tokens=32, ignore_eos=True) == ref["greedy_ids"].tolist()

    text = "<|start_of_role|>user<|end_of_role|>The quick brown fox likes 你好 and 🦊. 1234 3.14<|end_of_text|>"
    assert g.encode(text) == hf.encode(text)
    assert g.decode(ids, skip_special_tokens=False) == hf.decode(ids, skip_special_tokens=False)
    messages = [{"role": "user", "content": "Hello!"}]
    assert g.apply_chat_template(messages) == hf.apply_chat_template(messages)
    assert (g.vocab_size, g.eos_token_ids) == (hf.vocab_size, hf.eos_token_ids)
    # For a hybrid with NoPE attention llama.cpp's converter writes a context of 2^20.
    assert g.context_length == (2**20 if case == "hybrid_moe" else hf.context_length)
    same = ["parameters", "active_parameters", "attention_layers", "mamba_layers", "num_local_experts",
            "num_experts_per_tok", "ssm_state_bytes"]
    # hybrid_dense is written as a dense `granite` file, whose MLP is the shared MLP.
    same += ["shared_intermediate_size"] if case != "hybrid_dense" else []
    assert {k: g.model_info.get(k) for k in same} == {k: hf.model_info.get(k) for k in same}
