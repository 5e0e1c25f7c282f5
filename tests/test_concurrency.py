"""One Generator shared by many Python threads: the same results as alone, no crash, no deadlock,
the GIL free while the work runs, sessions independent, and a busy session a clear error.

What is shared: every call has its own KV cache, and one scheduler per Generator runs them all
together, one forward per step over every running call (continuous batching). A Session holds
one cache: a second call while one runs raises ValueError ("busy") at once, in any thread, rather
than queueing.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_checkpoint
from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
THREADS = 8
ROUNDS = 4
JOIN_TIMEOUT = 120
PROMPTS = [f"Thread {i} says: the quick brown fox" + " jumps" * i for i in range(THREADS)]
GREEDY = dict(max_new_tokens=12, ignore_eos=True)
SAMPLED = dict(max_new_tokens=12, ignore_eos=True, do_sample=True, temperature=0.8, top_p=0.9, seed=7)


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FIXTURES / "gqa_untied")


def run_threads(target, n: int = THREADS) -> list:
    """Runs target(i) on n threads started together; returns the results (or raises the first
    exception). Every thread must finish within JOIN_TIMEOUT."""
    results: list = [None] * n
    errors: list = []
    start = threading.Barrier(n)

    def work(i: int) -> None:
        try:
            start.wait()
            results[i] = target(i)
        except BaseException as e:  # noqa: BLE001 - reported below, PanicException included
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + JOIN_TIMEOUT
    for t in threads:
        t.join(timeout=max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), "a thread did not finish: deadlock or hang"
    if errors:
        raise errors[0]
    return results


def solo(g: Generator, prompt: str, first: int = 0) -> dict:
    """Everything one thread computes for `prompt`, the calls made starting at the `first`th."""
    ids = g.encode(prompt)
    calls = {
        "generate": lambda: g.generate(prompt, **GREEDY),
        "generate_ids": lambda: g.generate_ids(ids, **GREEDY),
        "stream": lambda: "".join(g.stream(prompt, **GREEDY)),
        "sampled": lambda: g.generate(prompt, **SAMPLED),
        "logits": lambda: g.logits(ids),
    }
    names = list(calls)
    order = names[first % len(names):] + names[: first % len(names)]
    return {name: calls[name]() for name in order}


def same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if key == "logits":
            np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-5)
        else:
            assert a[key] == b[key], key


def test_threads_get_what_they_get_alone(gen):
    expected = [solo(gen, p) for p in PROMPTS]

    def work(i: int) -> list[dict]:
        # Threads and rounds start at different calls, so the kinds of work mix.
        return [solo(gen, PROMPTS[i], first=i + r) for r in range(ROUNDS)]

    for i, rounds in enumerate(run_threads(work)):
        for result in rounds:
            same(result, expected[i])
    print(f"{THREADS} threads x {ROUNDS} rounds x {len(expected[0])} calls agree with single-threaded runs")


def test_sessions_in_threads_are_independent(gen):
    def conversation(g: Generator, i: int) -> list[str]:
        s = g.session()
        first = s.generate(PROMPTS[i], **GREEDY)
        second = s.generate(PROMPTS[i] + first + " and then", **GREEDY)
        fork = s.fork()
        return [first, second, fork.generate(PROMPTS[i] + " again", **GREEDY), s.generate("Bye", **GREEDY)]

    expected = [conversation(gen, i) for i in range(THREADS)]
    assert run_threads(lambda i: conversation(gen, i)) == expected


def test_one_stream_shared_by_threads(gen):
    """Threads pulling from one stream get disjoint chunks, together those of a lone stream."""
    kwargs = dict(max_new_tokens=60, ignore_eos=True)
    alone = gen.stream(PROMPTS[0], **kwargs)
    alone_chunks = list(alone)
    stream = gen.stream(PROMPTS[0], **kwargs)
    chunks = run_threads(lambda _: list(stream), 4)
    assert sorted(sum(chunks, [])) == sorted(alone_chunks)
    assert stream.token_ids == alone.token_ids


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Generator:
    """A model big enough that one call takes a noticeable time."""
    d = make_checkpoint(tmp_path_factory.mktemp("slow") / "m", hidden_size=256, intermediate_size=1024,
                        num_hidden_layers=4, max_position_embeddings=4096)
    return Generator(d)


def test_the_gil_is_free_while_threads_generate(slow):
    done = threading.Event()
    ticks = []

    def ticker() -> None:
        while not done.is_set():
            ticks.append(time.perf_counter())
            time.sleep(0.001)

    t = threading.Thread(target=ticker, daemon=True)
    start = time.perf_counter()
    t.start()
    run_threads(lambda i: slow.generate_ids([1, 2, 3 + i], max_new_tokens=500, ignore_eos=True), 4)
    done.set()
    t.join(timeout=5)
    elapsed = time.perf_counter() - start
    gaps = np.diff([start, *ticks])
    # A thread holding the GIL for a whole call would stall the ticker for that call.
    assert elapsed > 0.2 and len(ticks) > 20 and gaps.max() < elapsed / 4, (elapsed, len(ticks), gaps.max())


def test_a_second_call_on_a_busy_session_raises_in_any_thread(slow):
    """No queueing: while one thread generates on a session, every other call on it that needs
    the cache (generate, stream, reset, truncate, fork) raises ValueError at once."""
    s = slow.session()
    kwargs = dict(max_new_tokens=300, ignore_eos=True)
    started = threading.Event()
    result: dict = {}

    def work() -> None:
        stream = s.stream("The quick brown fox", **kwargs)  # the session's cache is taken here
        started.set()
        result["text"] = "".join(stream)

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    assert started.wait(JOIN_TIMEOUT)
    calls = [lambda: s.generate_ids([4, 5], max_new_tokens=1), lambda: s.stream("x"), s.reset,
             lambda: s.truncate(1), s.fork]
    busy = 0
    while worker.is_alive() and busy < 3 * len(calls):
        for call in calls:
            with pytest.raises(ValueError, match="the session is busy with another generation"):
                call()
            busy += 1
    worker.join(timeout=JOIN_TIMEOUT)
    assert not worker.is_alive()
    print(f"{busy} calls on the busy session raised")
    # The running call was not disturbed, and the session works again afterwards.
    assert result["text"] == slow.generate("The quick brown fox", **kwargs)
    assert s.generate("The quick brown fox", **kwargs) == result["text"]


def test_a_finished_stream_frees_its_session(gen):
    """Once a stream has ended the session takes its cache back, while the stream object lives."""
    s = gen.session()
    stream = s.stream("The quick", **GREEDY)
    text = "".join(stream)
    assert stream.finish_reason == "length" and len(stream.token_ids) == GREEDY["max_new_tokens"]
    assert s.cached_ids == gen.encode("The quick") + stream.token_ids[:-1]
    assert next(stream, None) is None
    assert s.generate("The quick", **GREEDY) == text == gen.generate("The quick", **GREEDY)


def test_concurrent_calls_share_forwards(slow):
    """Calls from threads join one batch: far fewer forwards than tokens, and each call's tokens
    are those it gets alone, greedy and seeded."""
    new = 48
    kw = [dict(max_new_tokens=new, ignore_eos=True, **({} if i % 2 else dict(do_sample=True, seed=i)))
          for i in range(THREADS)]
    alone = [slow.generate(PROMPTS[i], **kw[i]) for i in range(THREADS)]
    before = slow.scheduler_stats
    together = run_threads(lambda i: slow.generate(PROMPTS[i], **kw[i]))
    after = slow.scheduler_stats
    assert together == alone
    steps = after["steps"] - before["steps"]
    assert steps < THREADS * new / 2, f"{steps} forwards for {THREADS} calls of {new} tokens: not batched"
    assert after["tokens"] - before["tokens"] >= THREADS * new
    assert (after["running"], after["waiting"]) == (0, 0)


def test_calls_wait_for_room_in_the_kv_cache(tmp_path_factory):
    """With a pool too small for all calls at once, threads take turns: none fails, each gets
    what it gets alone, and every block comes back."""
    d = make_checkpoint(tmp_path_factory.mktemp("small_pool") / "m", max_position_embeddings=4096)
    positions = Generator(d).model_info["kv_cache_bytes"] // Generator(d).model_info["kv_cache_positions"]
    g = Generator(d, kv_cache_bytes=6 * 16 * positions)  # 96 positions: one or two calls at a time
    kw = dict(max_new_tokens=40, ignore_eos=True, do_sample=True)
    alone = [g.generate(PROMPTS[i], seed=i, **kw) for i in range(THREADS)]
    assert run_threads(lambda i: g.generate(PROMPTS[i], seed=i, **kw)) == alone
    assert g.model_info["kv_cache_free_positions"] == 96
