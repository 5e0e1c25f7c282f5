"""Property tests over the Python API's arguments: whatever a caller passes, only the documented
exceptions escape (ValueError, which includes UnicodeEncodeError, TypeError, OverflowError,
GraniteError), never a crash or a PanicException (which derives from BaseException, so it is not
caught as one of these). Derandomized with fixed example counts so that CI is repeatable."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from granite_rs import Generator, GraniteError

FIXTURES = Path(__file__).parent / "fixtures"
DOCUMENTED = (ValueError, TypeError, OverflowError, GraniteError)
FUZZ = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# The generator is module-level, not a fixture, so that @given functions can share it.
GEN = Generator(FIXTURES / "mha_tied")  # has a chat template

texts = st.text(st.characters(), max_size=40)  # st.characters() includes lone surrogates
surrogate = st.integers(0xD800, 0xDFFF).map(chr)
prompts = st.one_of(texts, st.builds(lambda a, s, b: a + s + b, texts, surrogate, texts))
big_ints = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64]))
values = st.one_of(
    st.none(),
    st.booleans(),
    big_ints,
    st.integers(0, 8),
    st.floats(),  # NaN, inf, huge, tiny, negative zero
    st.floats(0, 2),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e-300, 1e300, -0.0]),
    prompts,
    st.lists(st.one_of(big_ints, prompts, st.none()), max_size=4),
    st.dictionaries(texts, st.integers(), max_size=2),
)


def plausible_or_wild(plausible: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly values of the right type near the edges of the valid range, sometimes anything."""
    return st.one_of(plausible, plausible, plausible, values)


maybe = st.none()
KEYWORDS = {
    "max_new_tokens": st.integers(-2, 6) | maybe,
    "do_sample": st.booleans(),
    "temperature": st.floats(-1, 3) | st.sampled_from([math.nan, math.inf, 1e-40, 0.0]),
    "top_k": st.integers(-2, 400) | maybe,
    "top_p": st.floats(-0.5, 1.5) | maybe,
    "min_p": st.floats(-0.5, 1.5) | maybe,
    "repetition_penalty": st.floats(-1, 3) | maybe,
    "presence_penalty": st.floats(-3, 3) | maybe,
    "frequency_penalty": st.floats(-3, 3) | maybe,
    "seed": st.integers(-1, 2**64) | maybe,
    "stop": prompts | st.lists(prompts, max_size=3) | maybe,
    "stop_token_ids": st.lists(st.integers(-2, 400), max_size=3) | maybe,
    "ignore_eos": st.booleans(),
    "details": st.booleans(),
    "top_logprobs": st.integers(-1, 10),
}
kwargs_strategy = st.fixed_dictionaries({}, optional={k: plausible_or_wild(v) for k, v in KEYWORDS.items()})


def documented_only(call) -> object:
    """Runs call(); a documented exception is fine, anything else propagates. The outcome is an
    event for ``pytest --hypothesis-show-statistics``."""
    try:
        result = call()
    except DOCUMENTED as e:
        event(type(e).__name__)
        return None
    event("returned")
    return result


def bounded(kwargs: dict) -> dict:
    """Keeps runs short: a valid max_new_tokens is capped, an absent one set small."""
    n = kwargs.get("max_new_tokens")
    if n is None or (isinstance(n, int) and not isinstance(n, bool) and n > 8):
        kwargs = {**kwargs, "max_new_tokens": 4}
    return kwargs


@FUZZ
@given(kwargs=kwargs_strategy, method=st.sampled_from(["generate", "generate_ids", "stream", "chat", "batch"]))
def test_generation_keywords(kwargs, method):
    kwargs = bounded(kwargs)
    calls = {
        "generate": lambda: GEN.generate("Hello there", **kwargs),
        "generate_ids": lambda: GEN.generate_ids([5, 6, 7], **kwargs),
        "stream": lambda: list(GEN.stream("Hello there", **kwargs)),
        "chat": lambda: GEN.chat([{"role": "user", "content": "Hi"}], **kwargs),
        "batch": lambda: GEN.generate_batch(["Hello", "Hi there you"], **kwargs),
    }
    result = documented_only(calls[method])
    if method == "generate_ids" and result is not None:
        assert all(0 <= i < GEN.vocab_size for i in result)


ids_strategy = st.lists(big_ints, max_size=12) | st.lists(st.integers(0, 383), min_size=1, max_size=12)


@FUZZ
@given(ids=ids_strategy, method=st.sampled_from(["generate_ids", "decode", "logits", "session"]))
def test_token_ids(ids, method):
    calls = {
        "generate_ids": lambda: GEN.generate_ids(ids, max_new_tokens=2),
        "decode": lambda: GEN.decode(ids),
        "logits": lambda: GEN.logits(ids),
        "session": lambda: GEN.session().generate_ids(ids, max_new_tokens=2),
    }
    result = documented_only(calls[method])
    if method == "logits" and result is not None:
        assert result.shape == (len(ids), GEN.vocab_size)


@FUZZ
@given(prompt=prompts, stop=st.one_of(st.none(), prompts, st.lists(prompts, max_size=3)),
       method=st.sampled_from(["generate", "stream", "encode", "session", "batch"]))
def test_prompts_and_stop_strings(prompt, stop, method):
    calls = {
        "generate": lambda: GEN.generate(prompt, stop=stop, max_new_tokens=6),
        "stream": lambda: "".join(GEN.stream(prompt, stop=stop, max_new_tokens=6)),
        "encode": lambda: GEN.decode(GEN.encode(prompt)),
        "session": lambda: GEN.session().generate(prompt, stop=stop, max_new_tokens=6),
        "batch": lambda: GEN.generate_batch([prompt, "x"], stop=stop, max_new_tokens=6),
    }
    result = documented_only(calls[method])
    if result is not None and method != "batch":
        assert isinstance(result, str)
        if stop and method in ("generate", "stream"):
            for s in [stop] if isinstance(stop, str) else stop:
                assert s not in result


message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system"]) | prompts, "content": prompts})
odd_message = st.dictionaries(st.sampled_from(["role", "content", "name"]), values, max_size=3) | values
messages_strategy = st.lists(st.one_of(message, message, message, message, odd_message), max_size=4)


@FUZZ
@given(messages=messages_strategy, method=st.sampled_from(["apply_chat_template", "chat", "stream_chat", "session"]))
def test_chat_messages(messages, method):
    calls = {
        "apply_chat_template": lambda: GEN.apply_chat_template(messages),
        "chat": lambda: GEN.chat(messages, max_new_tokens=3),
        "stream_chat": lambda: "".join(GEN.stream_chat(messages, max_new_tokens=3)),
        "session": lambda: GEN.session().chat(messages, max_new_tokens=3),
    }
    result = documented_only(calls[method])
    assert result is None or isinstance(result, str)


def test_the_generator_still_works_after_fuzzing():
    assert len(GEN.generate_ids([1, 2, 3], max_new_tokens=3, ignore_eos=True)) == 3


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udc80" * 3])
def test_a_lone_surrogate_is_a_value_error(text):
    for call in (GEN.generate, GEN.encode, GEN.stream):
        with pytest.raises(UnicodeEncodeError):
            call(text)
    for stop in (text, ["x", text]):
        with pytest.raises(ValueError, match="stop: .*surrogates not allowed"):
            GEN.generate("hi", stop=stop)
