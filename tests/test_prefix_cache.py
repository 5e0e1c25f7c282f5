"""Automatic prefix caching with every block reused (`prefix_caching=True`; the exact default is
checked on the embedded model in test_real_model.py): a prompt that starts with tokens computed
before takes their KV blocks, counts them in `cached_tokens`, and gets the numbers of one forward
over the whole prompt; a shared block is copied before it is written; cached blocks nobody holds
make room for new ones, the least recently used first."""

from __future__ import annotations

import concurrent.futures
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
BLOCK = 16


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x - x.max() - np.log(np.exp(x - x.max()).sum())


def fixture(tmp_path: Path, name: str = "gqa_untied", **load) -> Generator:
    """The fixture with room for long prompts (the weights do not depend on it)."""
    d = tmp_path / name
    if not d.exists():
        shutil.copytree(FIXTURES / name, d)
        config = json.loads((d / "config.json").read_text())
        config["max_position_embeddings"] = 2048
        (d / "config.json").write_text(json.dumps(config))
    return Generator(d, **load)


def ids(g: Generator, n: int, seed: int) -> list[int]:
    return np.random.default_rng(seed).integers(0, g.vocab_size, n).tolist()


def assert_one_forwards(g: Generator, prompt: list[int], r) -> None:
    """Each new token is the greedy pick of one uncached forward over all before it, with its
    log-probability within 1e-4."""
    for i, token in enumerate(r.token_ids):
        expected = log_softmax(g.logits(prompt + r.token_ids[:i])[-1])
        assert expected.argmax() == token, i
        assert abs(r.logprobs[i] - expected[token]) < 1e-4, (i, r.logprobs[i], expected[token])


GREEDY = dict(max_new_tokens=8, ignore_eos=True, details=True)


@pytest.mark.parametrize("name", ["gqa_untied", "moe_shared"])
def test_a_shared_start_is_reused_with_the_numbers_of_one_forward(tmp_path, name):
    g = fixture(tmp_path, name, prefix_caching=True)
    assert g.model_info["prefix_caching"] == "all"
    system = ids(g, 300, 0)
    first = g.generate_ids(system + ids(g, 20, 1), **GREEDY)
    assert first.cached_tokens == 0
    # Every block the first request filled is cached once it has ended, and counts as free.
    info = g.model_info
    assert info["kv_cache_idle_cached_positions"] == (300 + 20 + 8 - 1) // BLOCK * BLOCK
    assert info["kv_cache_free_positions"] == info["kv_cache_positions"]
    prompt = system + ids(g, 37, 2)
    before = g.scheduler_stats["tokens"]
    r = g.generate_ids(prompt, **GREEDY)
    assert r.cached_tokens == 300 // BLOCK * BLOCK
    assert g.scheduler_stats["tokens"] - before == len(prompt) - r.cached_tokens + GREEDY["max_new_tokens"] - 1
    assert_one_forwards(g, prompt, r)
    # The whole prompt again: all but its last token (whose logits pick the first new one).
    again = g.generate_ids(prompt, **GREEDY)
    assert again.cached_tokens == (len(prompt) - 1) // BLOCK * BLOCK
    assert again.token_ids == r.token_ids


def test_earlier_turns_and_their_answers_are_reused(tmp_path):
    """A chat's next turn repeats the last answer: its blocks, filled by decode, are reused."""
    g = fixture(tmp_path, prefix_caching=True)
    prompt = ids(g, 40, 3)
    answer = g.generate_ids(prompt, max_new_tokens=40, ignore_eos=True, details=True).token_ids
    follow = prompt + answer + ids(g, 10, 4)
    r = g.generate_ids(follow, **GREEDY)
    assert r.cached_tokens == (len(prompt) + len(answer) - 1) // BLOCK * BLOCK
    assert_one_forwards(g, follow, r)


def test_the_default_and_mamba_layers(tmp_path):
    """By default prefix caching is on only where it is exact (the embedded model's tests check
    that): not for these float32 weights, whose prompt products sum a row by the row count, nor
    with experts. Models with Mamba2 layers never reuse prefixes."""
    for name in ("gqa_untied", "moe_shared"):
        g = fixture(tmp_path, name)
        prompt = ids(g, 100, 5)
        g.generate_ids(prompt, max_new_tokens=2)
        assert g.model_info["prefix_caching"] == "off"
        assert g.generate_ids(prompt, **GREEDY).cached_tokens == 0
    assert fixture(tmp_path, "moe_shared", prefix_caching=True).model_info["prefix_caching"] == "all"
    hybrid = fixture(tmp_path, "hybrid_moe", prefix_caching=True)
    assert hybrid.model_info["prefix_caching"] == "off"
    prompt = ids(hybrid, 100, 5)
    hybrid.generate_ids(prompt, max_new_tokens=2)
    assert hybrid.generate_ids(prompt, **GREEDY).cached_tokens == 0


def test_a_session_rewound_into_a_shared_block_copies_it(tmp_path):
    """A session that goes back to the middle of a block others may read writes its own copy:
    the block's first reader still finds the values it cached."""
    g = fixture(tmp_path, prefix_caching=True)
    plain = fixture(tmp_path)
    shared = ids(g, 40, 6)
    s = g.session()
    s.generate_ids(shared, max_new_tokens=4, ignore_eos=True)
    s.truncate(20)  # inside the second block, which is indexed
    other = shared[:20] + ids(g, 30, 7)
    r = s.generate_ids(other, **GREEDY)
    assert r.cached_tokens == 20
    assert r.token_ids == plain.generate_ids(other, **GREEDY).token_ids
    assert_one_forwards(g, other, r)
    again = g.generate_ids(shared + [1, 2, 3], **GREEDY)
    assert again.cached_tokens == 32
    assert_one_forwards(g, shared + [1, 2, 3], again)


def test_a_new_session_starts_from_a_cached_prefix(tmp_path):
    g = fixture(tmp_path, prefix_caching=True)
    system = ids(g, 64, 8)
    g.generate_ids(system + [5], max_new_tokens=1)
    s = g.session()
    prompt = system + ids(g, 9, 9)
    r = s.generate_ids(prompt, **GREEDY)
    assert r.cached_tokens == 64
    assert_one_forwards(g, prompt, r)
    follow = prompt + r.token_ids + [7, 8]
    assert s.generate_ids(follow, **GREEDY).cached_tokens == len(prompt) + len(r.token_ids) - 1


def test_the_least_recently_used_prefix_makes_room_first(tmp_path):
    g = fixture(tmp_path, prefix_caching=True)
    per_position = g.model_info["kv_cache_bytes"] // g.model_info["kv_cache_positions"]
    g = fixture(tmp_path, prefix_caching=True, kv_cache_bytes=per_position * 12 * BLOCK)
    a, b, c = (ids(g, 64, seed) for seed in (10, 11, 12))
    one = dict(max_new_tokens=1, details=True)
    for prompt in (a, b):  # 65 positions each: 4 full blocks cached, 1 free again
        g.generate_ids(prompt + [1], **one)
    assert g.model_info["kv_cache_idle_cached_positions"] == 8 * BLOCK
    assert g.generate_ids(a + [2], **one).cached_tokens == 64  # a is now the more recent
    # c takes 5 blocks: the 4 free ones, then b's last (the least recently let go) makes room.
    g.generate_ids(c + [3], **one)
    assert g.generate_ids(a + [4], **one).cached_tokens == 64
    assert g.generate_ids(b + [5], **one).cached_tokens == 48
    # A request that needs the whole pool takes every cached block.
    big = ids(g, 12 * BLOCK - 2, 13)
    r = g.generate_ids(big, max_new_tokens=2, ignore_eos=True, details=True)
    assert r.cached_tokens == 0 and len(r.token_ids) == 2
    assert_one_forwards(g, big, r)


def test_concurrent_requests_with_one_system_prompt(tmp_path):
    g = fixture(tmp_path, prefix_caching=True)
    plain = fixture(tmp_path)
    system = ids(g, 200, 14)
    prompts = [system + ids(g, 5 + 3 * i, 20 + i) for i in range(8)]
    kw = dict(max_new_tokens=12, ignore_eos=True, details=True)
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda p: g.generate_ids(p, **kw), prompts))
    alone = [plain.generate_ids(p, **kw) for p in prompts]
    assert [r.token_ids for r in results] == [r.token_ids for r in alone]
    for r, a in zip(results, alone):
        assert np.allclose(r.logprobs, a.logprobs, atol=1e-4)
    # Whoever came after the first step found the system prompt cached.
    assert any(r.cached_tokens == 192 for r in results)
    assert g.model_info["kv_cache_free_positions"] == g.model_info["kv_cache_positions"]


def test_random_traffic_on_a_small_pool_gives_uncached_answers(tmp_path):
    """Prompts that share starts of random lengths, run from threads on a pool that holds about
    three of them, with sessions, truncations and cancelled streams among them: each answer is
    the uncached one, and once all have ended every block is free or cached, none leaked."""
    plain = fixture(tmp_path)
    per_position = plain.model_info["kv_cache_bytes"] // plain.model_info["kv_cache_positions"]
    g = fixture(tmp_path, prefix_caching=True, kv_cache_bytes=per_position * 24 * BLOCK)
    rng = np.random.default_rng(30)
    stems = [ids(g, 70, 31 + i) for i in range(3)]
    prompts = [stems[rng.integers(3)][: rng.integers(1, 70)] + ids(g, int(rng.integers(1, 20)), 40 + i)
               for i in range(24)]
    kw = dict(max_new_tokens=6, ignore_eos=True)
    expected = [plain.generate_ids(p, **kw) for p in prompts]

    def run(i: int) -> list[int] | None:
        p = prompts[i]
        if i % 5 == 3:  # a stream cancelled after its first chunk
            stream = g.stream(g.decode(p), max_new_tokens=50, ignore_eos=True)
            next(stream)
            stream.cancel()
            list(stream)
            return None
        if i % 5 == 4:  # a session that rewinds into its prompt and goes on
            s = g.session()
            s.generate_ids(p + [9, 9, 9], max_new_tokens=2, ignore_eos=True)
            s.truncate(len(p) // 2)
            return s.generate_ids(p, **kw)
        return g.generate_ids(p, **kw)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        results = list(pool.map(run, range(len(prompts))))
    for i, (got, want) in enumerate(zip(results, expected)):
        assert got is None or got == want, i
    info = g.model_info
    assert info["kv_cache_free_positions"] == info["kv_cache_positions"]
    assert 0 < info["kv_cache_idle_cached_positions"] <= info["kv_cache_positions"]
