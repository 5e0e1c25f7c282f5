"""The scheduler that runs every generation: a prompt longer than one chunk is read in chunks of
`prefill_chunk` tokens, with the numbers of one forward over the whole prompt, for each mixer
and feed-forward kind, beside other generations or alone."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT_LEN = 700


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def long_context(tmp_path: Path, name: str) -> Generator:
    """The fixture with room for a long prompt (the weights do not depend on it)."""
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    config = json.loads((d / "config.json").read_text())
    config["max_position_embeddings"] = 2048
    (d / "config.json").write_text(json.dumps(config))
    return Generator(d)


@pytest.mark.parametrize("name", ["gqa_untied", "moe_shared", "hybrid_moe", "hybrid_mamba"])
def test_a_chunked_prompt_gives_the_numbers_of_one_forward(tmp_path, name):
    g = long_context(tmp_path, name)
    chunk = g.scheduler_stats["prefill_chunk"]
    assert PROMPT_LEN > 2 * chunk
    ids = np.random.default_rng(0).integers(0, g.vocab_size, PROMPT_LEN).tolist()
    before = g.scheduler_stats["steps"]
    r = g.generate_ids(ids, max_new_tokens=6, ignore_eos=True, details=True)
    # ceil(700 / 256) = 3 forwards read the prompt (the last gives the first token), then one per token.
    assert g.scheduler_stats["steps"] - before == -(-PROMPT_LEN // chunk) + 5
    # hybrid_mamba's time-step clamp binds, and transformers clamps a prompt's time steps, not a
    # decode step's: there only the first token (the prompt's chunks) is one forward's.
    checked = r.token_ids[:1] if name == "hybrid_mamba" else r.token_ids
    for i, token in enumerate(checked):
        expected = log_softmax(g.logits(ids + r.token_ids[:i])[-1])
        assert expected.argmax() == token
        assert abs(r.logprobs[i] - expected[token]) < 1e-4, (i, r.logprobs[i], expected[token])


def test_a_long_prompt_joins_a_decoding_generation(tmp_path):
    """A long prompt that arrives while another generation decodes is read chunk by chunk beside
    it (`scheduler.rs`'s unit tests check the steps' make-up); both give what they give alone."""
    g = long_context(tmp_path, "gqa_untied")
    long_ids = np.random.default_rng(1).integers(0, g.vocab_size, 1800).tolist()
    short_kw = dict(max_new_tokens=200, ignore_eos=True, do_sample=True, seed=3)
    alone = (g.generate("Hello", **short_kw), g.generate_ids(long_ids, max_new_tokens=4, ignore_eos=True))
    stream = g.stream("Hello", **short_kw)
    first = next(stream)  # decoding now
    long = g.generate_ids(long_ids, max_new_tokens=4, ignore_eos=True)
    assert (first + "".join(stream), long) == alone
