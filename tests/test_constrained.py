"""Constrained decoding on the embedded SmolLM2-135M-Instruct: every JSON result parses and
validates against its schema (checked with the jsonschema package), every regex result fully
matches, a Lark grammar's results are in its language; greedy and sampled, in every API."""

import asyncio
import json
import re
import subprocess
import sys

import jsonschema
import pytest

from granite_rs import Generator

pytestmark = pytest.mark.usefixtures("real_model_gguf")

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = {
    "person": {
        "type": "object",
        "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                       "email": {"type": "string", "format": "email", "maxLength": 40}},
        "required": ["name", "age"], "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "city": NAME,
            "location": {"type": "object", "properties": {
                "lat": {"type": "number", "minimum": -90, "maximum": 90},
                "lon": {"type": "number", "minimum": -180, "maximum": 180}},
                "required": ["lat", "lon"], "additionalProperties": False},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3},
        },
        "required": ["city", "location", "tags"], "additionalProperties": False,
    },
    "enum_and_const": {
        "type": "object",
        "properties": {"color": {"enum": ["red", "green", "blue"]}, "kind": {"const": "paint"},
                       "ok": {"type": "boolean"}, "note": {"type": ["string", "null"], "maxLength": 16}},
        "required": ["color", "kind", "ok"], "additionalProperties": False,
    },
    "patterns_and_formats": {
        "type": "object",
        "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                       "day": {"type": "string", "format": "date"},
                       "id": {"type": "string", "format": "uuid"}},
        "required": ["code", "day", "id"], "additionalProperties": False,
    },
    "array_of_objects": {
        "type": "array", "minItems": 2, "maxItems": 4,
        "items": {"type": "object", "properties": {"step": {"type": "integer", "minimum": 1, "maximum": 9},
                                                   "text": NAME},
                  "required": ["step", "text"], "additionalProperties": False},
    },
    "numbers": {
        "type": "object",
        # A JSON number has no bound on its digits; multipleOf gives it one.
        "properties": {"ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1, "multipleOf": 0.01},
                       "count": {"type": "integer", "minimum": -5, "maximum": 5},
                       "scores": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 100},
                                  "maxItems": 4}},
        "required": ["ratio", "count", "scores"], "additionalProperties": False,
    },
    "optional_keys": {
        "type": "object",
        "properties": {"title": NAME, "subtitle": NAME, "year": {"type": "integer", "minimum": 1900, "maximum": 2100}},
        "required": ["title"], "additionalProperties": False,
    },
    "refs": {
        "$defs": {"point": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9},
                                                             "y": {"type": "integer", "minimum": 0, "maximum": 9}},
                            "required": ["x", "y"], "additionalProperties": False}},
        "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
        "required": ["start", "end"], "additionalProperties": False,
    },
    "any_of": {
        "anyOf": [{"type": "integer", "minimum": 0, "maximum": 999},
                  {"type": "object", "properties": {"error": NAME}, "required": ["error"],
                   "additionalProperties": False}],
    },
}
PROMPT = [{"role": "user", "content": "Give me an example as JSON."}]
MODES = {"greedy": {}, "sampled": dict(do_sample=True, temperature=1.3, seed=7),
         "sampled_top": dict(do_sample=True, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=3)}
REGEXES = [r"\(\d{3}\) \d{3}-\d{4}", r"(yes|no)", r"[a-z]{3,8}( [a-z]{3,8}){1,3}\.", r"-?(0|[1-9]\d{0,5})\.\d{2}",
           r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d)"]
# A small Lark grammar; its language is also the regex below, which checks the results.
LARK = """
start: expr
expr: term (("+" | "-") term){1,3}
term: NUMBER | "(" expr ")"
NUMBER: /[1-9][0-9]{0,2}/
"""
LARK_CHECK = re.compile(r"[0-9+\-()]+")


@pytest.fixture(scope="module")
def smol(real_model_gguf) -> Generator:
    return Generator(real_model_gguf)


def validate(schema: dict, text: str) -> None:
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(value)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_json_result_parses_and_validates(smol, name, mode):
    schema = SCHEMAS[name]
    r = smol.chat(PROMPT, json_schema=schema, max_new_tokens=200, details=True, **MODES[mode])
    assert r.finish_reason == "stop", r.text
    validate(schema, r.text)


def test_a_schema_as_a_json_string_equals_the_dict(smol):
    schema = SCHEMAS["person"]
    assert smol.chat(PROMPT, json_schema=json.dumps(schema), max_new_tokens=80) == \
        smol.chat(PROMPT, json_schema=schema, max_new_tokens=80)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rx", REGEXES)
def test_every_regex_result_fully_matches(smol, rx, mode):
    r = smol.generate("Answer:", regex=rx, max_new_tokens=40, details=True, **MODES[mode])
    assert r.finish_reason == "stop", r.text
    assert re.fullmatch(rx, r.text), r.text


@pytest.mark.parametrize("mode", list(MODES))
def test_a_lark_grammar(smol, mode):
    r = smol.generate("Write a sum: ", grammar=LARK, max_new_tokens=60, details=True, **MODES[mode])
    assert r.finish_reason in ("stop", "eos"), r.text  # eos: the model ended where the grammar may end
    assert LARK_CHECK.fullmatch(r.text), r.text
    text = r.text
    assert text.count("(") == text.count(")") and not re.search(r"[+\-]{2}|^[+\-]|[+\-]$", text), text


def test_every_api_gives_the_same_constrained_text(smol):
    schema, kw = SCHEMAS["person"], dict(max_new_tokens=80, do_sample=True, seed=11)
    expected = smol.chat(PROMPT, json_schema=schema, **kw)
    validate(schema, expected)
    assert "".join(smol.stream_chat(PROMPT, json_schema=schema, **kw)) == expected
    assert smol.session().chat(PROMPT, json_schema=schema, **kw) == expected
    text = smol.apply_chat_template(PROMPT)
    ids = smol.generate_ids(smol.encode(text, add_special_tokens=False), json_schema=schema, **kw)
    assert smol.decode(ids) == expected

    async def collect() -> str:
        return "".join([c async for c in smol.achat(PROMPT, json_schema=schema, **kw)])

    assert asyncio.run(collect()) == expected


def test_batch_rows_equal_alone(smol):
    prompts = ["Name:", "A phone number:", "Say yes or no:"]
    kw = dict(regex=[r"[A-Z][a-z]{2,9}", REGEXES[0], r"(yes|no)"], max_new_tokens=20, seed=[1, 2, 3], do_sample=True)
    rows = smol.generate_batch(prompts, **kw)
    alone = [smol.generate(p, regex=rx, max_new_tokens=20, seed=s, do_sample=True)
             for p, rx, s in zip(prompts, kw["regex"], kw["seed"])]
    assert rows == alone
    assert all(re.fullmatch(rx, t) for rx, t in zip(kw["regex"], rows))
    unconstrained = smol.generate_batch(prompts, max_new_tokens=20)
    assert unconstrained == [smol.generate(p, max_new_tokens=20) for p in prompts]


@pytest.mark.parametrize("kw, needle", [
    (dict(json_schema={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}), "json_schema"),
    (dict(json_schema="{not json"), "json_schema: not JSON"),
    (dict(json_schema={"type": "integer", "minimum": 5, "maximum": 1}), "json_schema"),
    (dict(regex="(unclosed"), "regex"),
    (dict(grammar="start: undefined_rule"), "grammar"),
    (dict(grammar="this is not lark"), "grammar"),
    (dict(json_schema={"type": "string"}, regex="a"), "at most one"),
])
def test_bad_grammars_are_value_errors_and_the_model_stays_usable(smol, kw, needle):
    with pytest.raises(ValueError, match=needle):
        smol.generate("x", max_new_tokens=4, **kw)
    with pytest.raises(ValueError, match=needle):
        smol.stream("x", max_new_tokens=4, **kw)
    assert re.fullmatch(r"\d+", smol.generate("Count:", regex=r"\d+", max_new_tokens=4))


def test_wrong_types_are_type_errors(smol):
    with pytest.raises(TypeError, match="regex"):
        smol.generate("x", regex=5)
    with pytest.raises(TypeError, match="json_schema"):
        smol.generate("x", json_schema=object())


def test_a_cut_off_result_says_length(smol):
    r = smol.generate("x", regex=r"a{50}", max_new_tokens=3, details=True)
    assert r.finish_reason == "length" and len(r.token_ids) == 3 and set(r.text) == {"a"}


def test_cli_flags(tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"answer": {"enum": ["Paris", "Lyon"]}},
                                  "required": ["answer"], "additionalProperties": False}))
    lark = tmp_path / "yes_no.lark"
    lark.write_text('start: "yes" | "no"\n')
    runs = [(["generate", "--json-schema", str(schema), "The capital of France is"], ""),
            (["chat", "--json-schema", str(schema)], "What is the capital of France?\n"),
            (["generate", "--regex", "[0-9]{2}", "Two digits:"], ""),
            (["generate", "--grammar", str(lark), "Is Paris in France?"], "")]
    outputs = []
    for args, stdin in runs:
        out = subprocess.run([sys.executable, "-m", "granite_rs", *args], input=stdin, capture_output=True,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        outputs.append(out.stdout.strip())
    assert json.loads(outputs[0])["answer"] in ("Paris", "Lyon")
    assert json.loads(outputs[1])["answer"] in ("Paris", "Lyon")
    assert re.fullmatch(r"[0-9]{2}", outputs[2]) and outputs[3] in ("yes", "no")
    bad = subprocess.run([sys.executable, "-m", "granite_rs", "generate", "--json-schema", str(tmp_path / "none"), "x"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "cannot read" in bad.stderr


def test_cli_chat_tools(tmp_path):
    tools = tmp_path / "tools.json"
    tools.write_text(json.dumps(TOOLS))
    for choice, names in [("required", set(SCHEMA_OF)), ("search", {"search"})]:
        out = subprocess.run([sys.executable, "-m", "granite_rs", "chat", "--tools", str(tools), "--tool-choice", choice],
                             input="What is the weather in Paris?\n", capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        call = json.loads(out.stderr.strip().splitlines()[-1])
        assert call["name"] in names
        validate(SCHEMA_OF[call["name"]], json.dumps(call["arguments"]))
        assert "<tool_call>" in out.stdout


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city.", "parameters": {
        "type": "object", "properties": {"city": NAME, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "search", "description": "Searches the web.", "parameters": {
        "type": "object", "properties": {"query": {"type": "string", "maxLength": 40},
                                         "limit": {"type": "integer", "minimum": 1, "maximum": 10}},
        "required": ["query"], "additionalProperties": False}}},
]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.mark.parametrize("mode", list(MODES))
def test_required_tool_calls_are_valid_calls(smol, mode):
    r = smol.chat(ASK, tools=TOOLS, tool_choice="required", max_new_tokens=120, details=True, **MODES[mode])
    assert r.finish_reason == "stop", r.text
    assert r.content == "" and len(r.tool_calls) == 1, r.text
    (call,) = r.tool_calls
    validate(SCHEMA_OF[call["name"]], json.dumps(call["arguments"]))


@pytest.mark.parametrize("choice", [{"type": "function", "function": {"name": "search"}}, {"name": "search"}])
def test_a_named_function_is_the_one_called(smol, choice):
    for seed in range(3):
        r = smol.chat(ASK, tools=TOOLS, tool_choice=choice, max_new_tokens=120, details=True, do_sample=True, seed=seed)
        assert [c["name"] for c in r.tool_calls] == ["search"], r.text
        validate(SCHEMA_OF["search"], json.dumps(r.tool_calls[0]["arguments"]))


def test_streams_report_tool_calls_when_complete(smol):
    kw = dict(tools=TOOLS, tool_choice="required", max_new_tokens=120)
    expected = smol.chat(ASK, details=True, **kw)
    stream = smol.stream_chat(ASK, **kw)
    assert stream.tool_calls == []
    seen = []
    for _ in stream:
        seen.append(len(stream.tool_calls))
    assert seen[0] == 0 and seen[-1] == 1
    assert stream.tool_calls == expected.tool_calls


def test_auto_leaves_the_text_free_and_reports_what_is_there(smol):
    r = smol.chat(ASK, tools=TOOLS, max_new_tokens=20, details=True)
    assert r.tool_calls == [] and r.content == r.text.strip()
    assert smol.chat(ASK, tools=TOOLS, tool_choice="none", max_new_tokens=20) == r.text
    plain = smol.chat(ASK, max_new_tokens=5, details=True)
    assert plain.tool_calls is None and plain.content is None


@pytest.mark.parametrize("kw, needle", [
    (dict(tool_choice="required"), "needs tools"),
    (dict(tools=TOOLS, tool_choice={"name": "nowhere"}), "not among tools"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice must be"),
    (dict(tools=TOOLS, tool_choice="required", regex="a"), "cannot be combined with regex"),
    (dict(tools=[{"type": "function", "function": {"description": "no name"}}], tool_choice="required"), "no function name"),
])
def test_bad_tool_choices_are_value_errors(smol, kw, needle):
    with pytest.raises(ValueError, match=needle):
        smol.chat(ASK, max_new_tokens=4, **kw)


def test_the_grammar_time_is_reported(smol):
    r = smol.generate("Count:", regex=r"\d{5}", max_new_tokens=8, details=True)
    assert 0 < r.constraint_time < r.time_to_first_token + len(r.token_ids) / r.decode_tokens_per_s
    assert smol.generate("Count:", max_new_tokens=8, details=True).constraint_time == 0
