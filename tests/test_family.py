"""The Granite family beyond the dense models through the Python API: mixtures of experts
(granitemoe, granitemoeshared) and Granite 4.0's attention-only hybrids (granitemoehybrid, with RoPE
and a dense MLP, or NoPE with experts). What the dense models give (greedy tokens, sessions, batches,
streams) holds for them too. Their logits against transformers are checked in tests/parity.rs."""

from pathlib import Path

import pytest

from conftest import read_safetensors as load_file
from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
GREEDY = dict(max_new_tokens=12, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11]


FAMILY = {"moe": "granitemoe", "moe_shared": "granitemoeshared", "hybrid_dense": "granitemoehybrid",
          "hybrid_nope": "granitemoehybrid"}


@pytest.fixture(scope="module", params=list(FAMILY))
def case(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def gen(case) -> Generator:
    return Generator(FIXTURES / case)


def test_greedy_tokens_equal_transformers(gen, case):
    ref = load_file(FIXTURES / case / "reference.safetensors")
    ids = [int(i) for i in ref["input_ids"]]
    want = [int(i) for i in ref["greedy_ids"]]
    assert gen.generate_ids(ids, max_new_tokens=len(want), ignore_eos=True) == want


def test_batch_rows_equal_alone(gen):
    prompts = [PROMPT, PROMPT[:2], PROMPT * 3, [40, 41, 42]]
    kw = dict(max_new_tokens=10, ignore_eos=True, do_sample=True, temperature=0.8)
    seeds = [1, 2, 3, 4]
    alone = [gen.generate(gen.decode(p, skip_special_tokens=False), seed=s, **kw) for p, s in zip(prompts, seeds)]
    texts = [gen.decode(p, skip_special_tokens=False) for p in prompts]
    assert gen.generate_batch(texts, seed=seeds, **kw) == alone


def test_a_session_follow_up_equals_a_fresh_run(gen):
    s = gen.session()
    answer = s.generate_ids(PROMPT, **GREEDY)
    follow_up = PROMPT + answer + [12, 13]
    r = s.generate_ids(follow_up, details=True, **GREEDY)
    assert r.cached_tokens == len(PROMPT) + len(answer) - 1
    assert r.token_ids == gen.generate_ids(follow_up, **GREEDY)


def test_model_info_names_the_family_and_counts_every_parameter(gen, case):
    info = gen.model_info
    assert info["model_type"] == FAMILY[case]
    weights = load_file(FIXTURES / case / "model.safetensors")
    assert info["parameters"] == sum(w.size for w in weights.values())