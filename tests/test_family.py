"""The Granite family beyond the dense models through the Python API: mixtures of experts
(granitemoe, granitemoeshared) and Granite 4.0's hybrids (granitemoehybrid: attention only, with RoPE
and a dense MLP or NoPE with experts; and with Mamba2 layers, whose sessions go back only to
checkpoints). What the dense models give (greedy tokens, sessions, batches,
streams) holds for them too. Their logits against transformers are checked in tests/parity.rs."""

import json
from pathlib import Path

import pytest

from conftest import read_safetensors as load_file
from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
GREEDY = dict(max_new_tokens=12, ignore_eos=True)
PROMPT = [5, 6, 7, 8, 9, 10, 11]


FAMILY = {"moe": "granitemoe", "moe_shared": "granitemoeshared", "hybrid_dense": "granitemoehybrid",
          "hybrid_nope": "granitemoehybrid", "hybrid_moe": "granitemoehybrid", "hybrid_mamba": "granitemoehybrid"}


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


@pytest.mark.parametrize("quantize", ["q8_0", "q4_0", "q4_k"])
def test_quantized_experts_rows_equal_alone(quantize):
    """Q8_0 and Q4_0 experts run a prompt's rows routed to each as decode (up to 128 of them);
    the k-quants as a prompt. Either way a row gets what it gets alone, and near the f32 model."""
    g = Generator(FIXTURES / "hybrid_moe", quantize=quantize)
    ref = load_file(FIXTURES / "hybrid_moe" / "reference.safetensors")
    ids = [int(i) for i in ref["input_ids"]]
    logits = g.logits(ids)
    assert abs(logits - ref["logits"]).max() <= 0.1 * abs(ref["logits"]).max()
    prompts = [ids, PROMPT * 6, PROMPT[:3], ids[:20]]
    kw = dict(max_new_tokens=6, ignore_eos=True, do_sample=True, temperature=0.8)
    texts = [g.decode(p, skip_special_tokens=False) for p in prompts]
    alone = [g.generate(t, seed=i, **kw) for i, t in enumerate(texts)]
    assert g.generate_batch(texts, seed=list(range(len(texts))), **kw) == alone


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
    # One sequence's Mamba2 state: per Mamba layer, the convolution's window and the SSM state.
    mamba = [w for name, w in weights.items() if name.endswith("mamba.conv1d.weight")]
    state = json.loads((FIXTURES / case / "config.json").read_text()).get("mamba_d_state")
    inner = [w.size for name, w in weights.items() if name.endswith("mamba.norm.weight")]
    want = sum(4 * (c.shape[0] * (c.shape[2] - 1) + i * state) for c, i in zip(mamba, inner))
    assert (info["mamba_layers"], info.get("ssm_state_bytes")) == ((len(mamba), want) if mamba else (0, None))
    assert info["attention_layers"] == info["num_hidden_layers"] - len(mamba)
    # A token uses every parameter but those of the experts its router does not select.
    config = json.loads((FIXTURES / case / "config.json").read_text())
    experts = [w for name, w in weights.items() if name.endswith(("input_linear.weight", "output_linear.weight"))
               and "block_sparse_moe" in name]
    if experts:
        count, per_token = config["num_local_experts"], config["num_experts_per_tok"]
        assert (info["num_local_experts"], info["num_experts_per_tok"]) == (count, per_token)
        idle = sum(w.size for w in experts) * (count - per_token) // count
    else:
        assert "num_local_experts" not in info
        idle = 0
    assert info["active_parameters"] == info["parameters"] - idle

@pytest.fixture(scope="module", params=["hybrid_moe", "hybrid_mamba"])
def mamba(request) -> Generator:
    return Generator(FIXTURES / request.param)


def test_a_mamba_session_goes_back_to_its_checkpoints(mamba):
    s = mamba.session()
    answer = s.generate_ids(PROMPT, **GREEDY)
    # A follow-up that leaves the answer after two tokens: back to the end of the prompt.
    follow_up = PROMPT + answer[:2] + [12, 13]
    r = s.generate_ids(follow_up, details=True, **GREEDY)
    assert r.cached_tokens == len(PROMPT)
    assert r.token_ids == mamba.generate_ids(follow_up, **GREEDY)
    # The first prompt again: back to the checkpoint one token before its end.
    again = s.generate_ids(PROMPT, details=True, **GREEDY)
    assert (again.cached_tokens, again.token_ids) == (len(PROMPT) - 1, answer)


def test_a_mamba_session_truncates_only_to_a_checkpoint(mamba):
    s = mamba.session()
    s.generate_ids(PROMPT, **GREEDY)
    cached = len(s.cached_ids)
    with pytest.raises(ValueError, match=rf"can go back to \[0, {len(PROMPT) - 1}, {len(PROMPT)}, {cached}\] cached"):
        s.truncate(3)
    assert len(s.cached_ids) == cached
    copy = s.fork()
    s.truncate(len(PROMPT))
    assert s.cached_ids == PROMPT
    follow_up = PROMPT + [20, 21]
    want = mamba.generate_ids(follow_up, **GREEDY)
    for session in (s, copy):
        assert session.generate_ids(follow_up, **GREEDY) == want
