"""`granite-rs serve` as a real process on 127.0.0.1, driven by the official openai client: greedy
results equal the Python API's, streams equal non-streams, concurrent clients, errors in OpenAI's
shape, and a disconnecting client."""

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from granite_rs import Generator

FIXTURE = Path(__file__).parent / "fixtures" / "gqa_untied"
KEY = "sk-test-key"
MESSAGES = [{"role": "user", "content": "Name a fox."}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(base: str, proc: subprocess.Popen) -> str:
    """`base` once the server answers /health."""
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=1)
            return base
        except (urllib.error.URLError, ConnectionError):
            if proc.poll() is not None:
                pytest.fail(f"the server exited: {proc.stderr.read()}")
            time.sleep(0.1)
    pytest.fail("the server did not start within a minute")


@pytest.fixture(scope="module")
def server():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "granite_rs", "serve", "-m", str(FIXTURE), "--port", str(port),
                             "--api-key", KEY, "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    base = wait_for(f"http://127.0.0.1:{port}", proc)
    yield base
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FIXTURE)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list()] == ["granite"]
    h = json.loads(urllib.request.urlopen(server + "/health").read())
    assert (h["status"], h["running"], h["batch"], h["waiting"]) == ("ok", 0, 0, 0)
    assert h["kv_cache_free_positions"] > 0


def test_greedy_chat_and_completion_equal_the_python_api(client, gen):
    r = client.chat.completions.create(model="granite", messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.choices[0].message.content == gen.chat(MESSAGES, max_new_tokens=12, do_sample=False)
    alone = gen.chat(MESSAGES, max_new_tokens=12, do_sample=False, details=True)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (alone.prompt_tokens, len(alone.token_ids))
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    c = client.completions.create(model="granite", prompt="The fox", max_tokens=10, temperature=0)
    assert c.choices[0].text == gen.generate("The fox", max_new_tokens=10, do_sample=False)
    assert c.choices[0].finish_reason in ("stop", "length")


def test_streaming_equals_non_streaming(client):
    kw = dict(model="granite", messages=MESSAGES, max_tokens=16, temperature=0.8, seed=5)
    whole = client.chat.completions.create(**kw).choices[0].message.content
    parts = client.chat.completions.create(stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in parts if c.choices) == whole
    text = "".join(c.choices[0].text for c in client.completions.create(
        model="granite", prompt="Hi", max_tokens=8, temperature=0, stream=True))
    assert text == client.completions.create(model="granite", prompt="Hi", max_tokens=8, temperature=0).choices[0].text


def test_logprobs_equal_the_python_api(client, gen):
    alone = gen.chat(MESSAGES, max_new_tokens=10, do_sample=False, details=True, top_logprobs=3)
    kw = dict(model="granite", messages=MESSAGES, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    content = client.chat.completions.create(**kw).choices[0].logprobs.content
    assert [e.logprob for e in content] == pytest.approx(alone.logprobs, abs=1e-6)
    assert [t.logprob for e in content for t in e.top_logprobs] == pytest.approx(
        [v for top in alone.top_logprobs for _, v in top], abs=1e-6)
    assert [e.token for e in content] == [gen.decode([t], skip_special_tokens=False) for t in alone.token_ids]
    assert content[0].bytes == list(content[0].token.encode())
    streamed = [e for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    # Completions: logprobs is the number of alternatives.
    plain = gen.generate("The fox", max_new_tokens=6, do_sample=False, details=True, top_logprobs=2)
    c = client.completions.create(model="granite", prompt="The fox", max_tokens=6, temperature=0, logprobs=2)
    lp = c.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(plain.logprobs, abs=1e-6)
    assert [len(top) for top in lp.top_logprobs] == [2] * len(plain.token_ids)
    assert "".join(lp.tokens) == c.choices[0].text and lp.text_offset[0] == 0
    assert client.chat.completions.create(model="granite", messages=MESSAGES, max_tokens=2).choices[0].logprobs is None


def test_json_schema_response_format(client):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    r = client.chat.completions.create(model="granite", messages=MESSAGES, max_tokens=40, response_format={
        "type": "json_schema", "json_schema": {"name": "n", "schema": schema}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"n"} and 0 <= value["n"] <= 9


def test_sixteen_concurrent_streaming_clients(client, gen):
    prompts = [f"Story {i}:" for i in range(16)]
    results = {}

    def one(p):
        chunks = client.completions.create(model="granite", prompt=p, max_tokens=12, temperature=0, stream=True)
        results[p] = "".join(c.choices[0].text for c in chunks)

    threads = [threading.Thread(target=one, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert results == {p: gen.generate(p, max_new_tokens=12, do_sample=False) for p in prompts}


@pytest.mark.parametrize("call, status", [
    (lambda c: c.chat.completions.create(model="nope", messages=MESSAGES), 404),
    (lambda c: c.chat.completions.create(model="granite", messages=[]), 400),
    (lambda c: c.chat.completions.create(model="granite", messages=MESSAGES, top_p=3.0), 400),
    (lambda c: c.completions.create(model="granite", prompt="x " * 5000, max_tokens=4), 400),
    (lambda c: c.chat.completions.create(model="granite", messages=MESSAGES, logprobs=True, top_logprobs=21), 400),
    (lambda c: c.chat.completions.create(model="granite", messages=MESSAGES, top_logprobs=2), 400),
    (lambda c: c.completions.create(model="granite", prompt="x", logprobs=6), 400),
])
def test_bad_requests_are_openai_errors_and_the_server_keeps_serving(client, call, status):
    with pytest.raises(openai.APIStatusError) as e:
        call(client)
    assert e.value.status_code == status and e.value.body["message"]
    assert client.completions.create(model="granite", prompt="ok", max_tokens=2).choices


def test_api_key_and_malformed_json(server):
    wrong = openai.OpenAI(base_url=server + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    req = urllib.request.Request(server + "/v1/chat/completions", data=b"{not json", method="POST",
                                 headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_prefix_caching_reports_cached_tokens():
    """With --prefix-caching, a second request with the same system prompt computes only its own
    part, and the usage says how much it found cached."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "granite_rs", "serve", "-m", str(FIXTURE), "--port", str(port),
                             "--prefix-caching", "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = openai.OpenAI(base_url=wait_for(f"http://127.0.0.1:{port}", proc) + "/v1", api_key="x",
                               max_retries=0)
        system = {"role": "system", "content": "You answer questions about foxes. " * 3}
        usages = [client.chat.completions.create(model="granite", messages=[system, {"role": "user", "content": q}],
                                                 max_tokens=4, temperature=0).usage for q in ("Hi", "Why?")]
        assert usages[0].prompt_tokens_details.cached_tokens == 0
        assert usages[1].prompt_tokens_details.cached_tokens >= 32
        assert usages[1].prompt_tokens_details.cached_tokens < usages[1].prompt_tokens
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def smol_server(real_model_gguf):
    """A server of the embedded model, whose context holds a generation of about a minute."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "granite_rs", "serve", "-m", str(real_model_gguf), "--port",
                             str(port), "-q"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    yield wait_for(f"http://127.0.0.1:{port}", proc)
    proc.terminate()
    proc.wait(timeout=30)


def test_tool_calls_in_openai_shape(smol_server):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"],
        "additionalProperties": False}}}]
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    client = openai.OpenAI(base_url=smol_server + "/v1", api_key="unused", max_retries=0)
    r = client.chat.completions.create(model="granite", messages=ask, tools=tools, tool_choice="required",
                                       max_tokens=60)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert set(json.loads(call.function.arguments)) == {"city"}
    chunks = list(client.chat.completions.create(model="granite", messages=ask, tools=tools, tool_choice="required",
                                                 max_tokens=60, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    (streamed,) = [t for d in deltas for t in (d.tool_calls or [])]
    assert streamed.function.name == "get_weather" and streamed.function.arguments == call.function.arguments
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_disconnecting_client_frees_its_generation(smol_server):
    """A client that leaves after its first event ends its generation within seconds."""
    port = int(smol_server.rsplit(":", 1)[1])
    body = json.dumps({"model": "granite", "prompt": "Go on and on", "max_tokens": 8000, "stream": True,
                       "ignore_eos": True, "temperature": 0}).encode()
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    received = b""
    while b"data:" not in received:
        received += sock.recv(4096)
    assert health(smol_server)["running"] == 1
    sock.close()
    deadline = time.monotonic() + 10
    while health(smol_server)["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert health(smol_server)["running"] == 0


def health(base: str) -> dict:
    return json.loads(urllib.request.urlopen(base + "/health", timeout=5).read())
