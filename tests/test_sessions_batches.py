"""Sessions, chat, batches, details, asyncio and cancellation."""

import _thread
import asyncio
import json
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import make_checkpoint
from granite_rs import GenerationResult, Generator, aiterate

FIXTURES = Path(__file__).parent / "fixtures"
GREEDY = dict(max_new_tokens=24, ignore_eos=True)
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a fox. 🦊"},
]


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FIXTURES / "gqa_untied")


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> Generator:
    """A model big enough that a prefill takes a while."""
    d = make_checkpoint(tmp_path_factory.mktemp("slow") / "m", hidden_size=512, intermediate_size=2048,
                        num_hidden_layers=8, max_position_embeddings=4096)
    return Generator(d)


# --- sessions -----------------------------------------------------------------------------------


def test_second_turn_reuses_the_cache_and_matches_a_fresh_run(gen):
    s = gen.session()
    first = "The quick brown fox"
    r1 = s.generate(first, details=True, **GREEDY)
    assert r1.cached_tokens == 0 and r1.prompt_tokens == len(gen.encode(first))
    assert r1.text == gen.generate(first, **GREEDY)
    # The cache holds the prompt and every generated token but the last (never fed back).
    assert s.cached_ids == gen.encode(first) + r1.token_ids[:-1]

    second = first + r1.text + " and then 你好"
    r2 = s.generate(second, details=True, **GREEDY)
    ids2 = gen.encode(second)
    common = 0
    while common < len(ids2) - 1 and gen.encode(first)[:common + 1] == ids2[:common + 1]:
        common += 1
    assert r2.cached_tokens >= common > 0, (r2.cached_tokens, common)
    assert r2.prompt_tokens == len(ids2)
    assert r2.text == gen.generate(second, **GREEDY)


def test_reuse_on_token_ids_prefills_only_the_new_tokens(gen):
    s = gen.session()
    p1 = [5, 6, 7, 8, 9]
    new1 = s.generate_ids(p1, **GREEDY)
    p2 = p1 + new1 + [10, 11]
    assert s.generate_ids(p2, **GREEDY) == gen.generate_ids(p2, **GREEDY)
    # The same prompt again: everything but its last token is cached.
    r = s.generate(gen.decode(p2), details=True, **GREEDY) if gen.encode(gen.decode(p2)) == p2 else None
    if r is not None:
        assert r.cached_tokens == len(p2) - 1


def test_truncate_reset_and_fork(gen):
    s = gen.session()
    s.generate_ids([5, 6, 7, 8], **GREEDY)
    n = len(s.cached_ids)
    f = s.fork()
    s.truncate(3)
    assert s.cached_ids == [5, 6, 7] and len(f.cached_ids) == n
    # The fork shares nothing: generating on it does not disturb the original, and vice versa.
    assert f.generate_ids([5, 6, 7, 8, 1, 2], **GREEDY) == gen.generate_ids([5, 6, 7, 8, 1, 2], **GREEDY)
    assert s.generate_ids([5, 6, 7, 9], **GREEDY) == gen.generate_ids([5, 6, 7, 9], **GREEDY)
    s.reset()
    assert s.cached_ids == []


def test_a_busy_session_is_a_clear_error_and_recovers(gen):
    s = gen.session()
    stream = s.stream("The quick", **GREEDY)
    next(stream)
    with pytest.raises(ValueError, match="busy"):
        s.generate("again", **GREEDY)
    del stream
    assert s.generate("The quick", **GREEDY) == gen.generate("The quick", **GREEDY)


def test_a_bad_argument_leaves_the_session_as_it_was(gen):
    s = gen.session()
    s.generate_ids([5, 6, 7], **GREEDY)
    before = s.cached_ids
    with pytest.raises(ValueError):
        s.generate_ids([5, 6, 7], top_p=2.0)
    assert s.cached_ids == before


# --- chat ----------------------------------------------------------------------------------------


def test_chat_is_generation_on_the_rendered_template(gen):
    text = gen.apply_chat_template(CHAT)
    assert gen.chat(CHAT, **GREEDY) == gen.decode(gen.generate_ids(gen.encode(text, add_special_tokens=False), **GREEDY))
    assert "".join(gen.stream_chat(CHAT, **GREEDY)) == gen.chat(CHAT, **GREEDY)


def test_chat_turns_in_a_session_reuse_earlier_turns(gen):
    s = gen.session()
    answer = s.chat(CHAT, **GREEDY)
    turn2 = CHAT + [{"role": "assistant", "content": answer}, {"role": "user", "content": "Another?"}]
    r = s.chat(turn2, details=True, **GREEDY)
    assert r.cached_tokens >= len(gen.encode(gen.apply_chat_template(CHAT), add_special_tokens=False)) - 1
    assert r.text == gen.chat(turn2, **GREEDY)


def test_bad_messages_are_errors(gen):
    with pytest.raises(ValueError, match="undefined"):
        gen.chat([{"content": "hi"}])
    with pytest.raises(TypeError, match="messages must be a list of dicts"):
        gen.chat("hi")
    with pytest.raises(TypeError, match=r"messages\[1\] must be a dict, got int"):
        gen.chat([{"role": "user", "content": "hi"}, 3])
    with pytest.raises(ValueError, match="empty conversation"):
        gen.chat([])


# --- batches -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", ["mha_tied", "gqa_untied", "mqa_bias", "rope_linear", "rope_dynamic", "llama_like"])
def test_greedy_batch_equals_one_by_one(case):
    g = Generator(FIXTURES / case)
    prompts = ["The quick brown fox likes", "你好", "def main(): return 42 and more text here", "x"]
    assert g.generate_batch(prompts, **GREEDY) == [g.generate(p, **GREEDY) for p in prompts]


def test_batch_with_stop_strings_and_eos(gen):
    prompts = ["The quick brown fox", "Emoji 🦊"]
    alone = [gen.generate(p, max_new_tokens=30, ignore_eos=True) for p in prompts]
    stop = alone[0][5:9]
    kw = dict(max_new_tokens=30, ignore_eos=True, stop=stop)
    assert gen.generate_batch(prompts, **kw) == [gen.generate(p, **kw) for p in prompts]
    assert gen.generate_batch([]) == []


def test_seeded_sampling_in_a_batch_matches_one_by_one(gen):
    kw = dict(max_new_tokens=16, ignore_eos=True, do_sample=True, seed=5, top_k=20)
    assert gen.generate_batch(["The quick"], **kw) == [gen.generate("The quick", **kw)]


# --- details -------------------------------------------------------------------------------------


def test_details_logprobs_match_the_model(gen):
    prompt = "The quick brown fox"
    r = gen.generate(prompt, details=True, top_logprobs=3, **GREEDY)
    assert isinstance(r, GenerationResult) and r.finish_reason == "length"
    assert r.text == gen.generate(prompt, **GREEDY) and len(r.token_ids) == 24
    ids = gen.encode(prompt)
    logits = gen.logits(ids + r.token_ids[:-1])[len(ids) - 1 :]
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    chosen = logp[np.arange(len(r.token_ids)), r.token_ids]
    np.testing.assert_allclose(r.logprobs, chosen, atol=1e-4)
    for top, row, token in zip(r.top_logprobs, logp, r.token_ids):
        assert len(top) == 3 and top[0][0] == token  # greedy picks the most likely
        np.testing.assert_allclose([p for _, p in top], np.sort(row)[::-1][:3], atol=1e-4)
    assert r.time_to_first_token > 0 and r.decode_tokens_per_s > 0


# --- asyncio and cancellation ----------------------------------------------------------------------


def test_astream_equals_generate_and_leaves_the_loop_free(slow):
    async def main():
        ticks = 0
        done = False

        async def ticker():
            nonlocal ticks
            while not done:
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        chunks = [c async for c in slow.astream("The quick", max_new_tokens=40, ignore_eos=True)]
        done = True
        await t
        return chunks, ticks

    start = time.perf_counter()
    chunks, ticks = asyncio.run(main())
    elapsed = time.perf_counter() - start
    assert "".join(chunks) == slow.generate("The quick", max_new_tokens=40, ignore_eos=True)
    assert ticks > elapsed / 0.001 / 10, (ticks, elapsed)


def test_cancelling_an_async_task_stops_the_work(slow):
    async def main():
        chunks = []

        async def consume():
            async for c in slow.astream("The quick", max_new_tokens=2000, ignore_eos=True):
                chunks.append(c)

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return chunks

    produced = asyncio.run(main())
    assert 0 < len(produced) < 2000


def test_cancel_stops_a_long_prefill_within_a_layer(slow):
    text = "The quick brown fox. " * 200
    ids = slow.encode(text)
    assert 2000 < len(ids) < 4000
    t0 = time.perf_counter()
    slow.logits(ids[: len(ids) // 2])
    prefill_time = time.perf_counter() - t0
    stream = slow.stream(text, max_new_tokens=5)
    threading.Timer(prefill_time / 10, stream.cancel).start()
    t0 = time.perf_counter()
    assert list(stream) == []
    assert time.perf_counter() - t0 < prefill_time, (time.perf_counter() - t0, prefill_time)


def test_getters_do_not_wait_for_a_next_blocked_on_another_thread(slow):
    text = "The quick brown fox. " * 200
    ids = slow.encode(text)
    t0 = time.perf_counter()
    slow.logits(ids)
    prefill_time = time.perf_counter() - t0
    stream = slow.stream(text, max_new_tokens=3, ignore_eos=True, top_logprobs=1)
    first = []
    waiting = threading.Thread(target=lambda: first.append(next(stream)))
    waiting.start()
    time.sleep(prefill_time / 10)  # `next` is in the prefill now
    t0 = time.perf_counter()
    seen = (stream.token_ids, stream.finish_reason, stream.logprobs, stream.prompt_tokens)
    took = time.perf_counter() - t0
    waiting.join()
    assert seen == ([], None, [], 0)
    assert took < prefill_time / 4, (took, prefill_time)
    # Each getter is current after each chunk, and after the end.
    assert len(stream.token_ids) == len(stream.logprobs) >= 1
    rest = list(stream)
    assert first[0] + "".join(rest) == slow.decode(stream.token_ids)
    assert len(stream.token_ids) == 3 and stream.finish_reason == "length" and stream.prompt_tokens == len(ids)


@pytest.fixture
def ctrl_c():
    """Python's own SIGINT handler, as in an interactive run: a shell that starts pytest in the
    background hands it SIGINT ignored, and then interrupt_main does nothing."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_keyboard_interrupt_stops_generate(slow, ctrl_c):
    threading.Timer(0.3, _thread.interrupt_main).start()
    t0 = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        slow.generate_ids([5, 6, 7], max_new_tokens=3000, ignore_eos=True)
    assert time.perf_counter() - t0 < 2.0
    assert slow.generate_ids([5, 6], max_new_tokens=2, ignore_eos=True)  # still usable


def test_aiterate_works_on_session_streams(gen):
    s = gen.session()

    async def main():
        return [c async for c in aiterate(s.stream("The quick", **GREEDY))]

    assert "".join(asyncio.run(main())) == gen.generate("The quick", **GREEDY)


def test_generation_config_sets_the_defaults(tmp_path):
    from conftest import copy_fixture

    d = copy_fixture(tmp_path, "gqa_untied")
    cfg = json.loads((d / "generation_config.json").read_text())
    cfg.update(max_new_tokens=5, repetition_penalty=1.7)
    (d / "generation_config.json").write_text(json.dumps(cfg))
    g, plain = Generator(d), Generator(FIXTURES / "gqa_untied")
    ids = g.generate_ids([5, 6, 7], ignore_eos=True)
    assert ids == plain.generate_ids([5, 6, 7], ignore_eos=True, max_new_tokens=5, repetition_penalty=1.7)
    assert len(g.generate_ids([5, 6, 7], ignore_eos=True, max_new_tokens=9)) == 9  # a keyword wins
