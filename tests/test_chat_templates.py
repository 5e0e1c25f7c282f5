"""Chat templates with tools, documents and any other variable, as transformers renders them."""

import asyncio
import dataclasses
import json
from pathlib import Path

import pytest

from granite_rs import Generator

FIXTURES = Path(__file__).parent / "fixtures"
REFERENCE = json.loads((FIXTURES / "chat_reference.json").read_text())["cases"]
GREEDY = dict(max_new_tokens=12, ignore_eos=True)
CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOLS_TEMPLATE = "{% for t in tools %}[{{ t.function.name }}]{% endfor %}{{ documents | tojson }}|{{ thinking }}|" \
                 "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}"


def with_template(tmp_path: Path, fixture: str, template: str) -> Path:
    """A copy of a fixture directory (its files linked) whose chat template is `template`."""
    d = tmp_path / f"t{abs(hash(template))}"
    if not d.exists():
        d.mkdir()
        for f in (FIXTURES / fixture).iterdir():
            if f.name != "chat_template.jinja":  # written below, not through a link into the fixture
                (d / f.name).symlink_to(f)
        (d / "chat_template.jinja").write_text(template)
    return d


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FIXTURES / "gqa_untied")


@pytest.fixture(scope="module")
def tool_gen(tmp_path_factory) -> Generator:
    return Generator(with_template(tmp_path_factory.mktemp("tools"), "gqa_untied", TOOLS_TEMPLATE))


def test_every_reference_case_renders_as_transformers(tmp_path):
    assert len(REFERENCE) >= 80
    with_variables = [c for c in REFERENCE if c.get("variables")]
    assert any("tools" in c["variables"] for c in with_variables)
    assert any("documents" in c["variables"] for c in with_variables)
    assert any("thinking" in c["variables"] for c in with_variables)
    generators: dict = {}
    for i, case in enumerate(REFERENCE):
        key = (case["fixture"], case["template"])
        if key not in generators:
            d = FIXTURES / case["fixture"]
            if case["template"] is not None:
                d = with_template(tmp_path, case["fixture"], case["template"])
            generators[key] = Generator(d)
        variables = case.get("variables", {})
        ours = generators[key].apply_chat_template(case["messages"], case["add_generation_prompt"], **variables)
        assert ours == case["expected"], f"case {i}"


def test_variables_reach_the_template(tool_gen):
    docs = [{"title": "t", "text": "x"}]
    text = tool_gen.apply_chat_template(CHAT, tools=TOOLS, documents=docs, thinking=True)
    assert text == '[get_weather][{"title": "t", "text": "x"}]|True|user:What is the weather in Paris?;'
    assert tool_gen.apply_chat_template(CHAT) == "null||user:What is the weather in Paris?;"


def test_chat_with_variables_is_generation_on_the_rendered_template(tool_gen):
    text = tool_gen.apply_chat_template(CHAT, tools=TOOLS, thinking=True)
    expected = tool_gen.generate_ids(tool_gen.encode(text, add_special_tokens=False), **GREEDY)
    r = tool_gen.chat(CHAT, tools=TOOLS, thinking=True, details=True, **GREEDY)
    assert r.token_ids == expected
    assert "".join(tool_gen.stream_chat(CHAT, tools=TOOLS, thinking=True, **GREEDY)) == r.text
    assert tool_gen.chat(CHAT, tools=TOOLS, chat_template_kwargs={"thinking": True}, **GREEDY) == r.text
    assert tool_gen.session().chat(CHAT, tools=TOOLS, thinking=True, **GREEDY) == r.text

    async def collect() -> str:
        return "".join([c async for c in tool_gen.achat(CHAT, tools=TOOLS, thinking=True, **GREEDY)])

    assert asyncio.run(collect()) == r.text
    assert tool_gen.apply_chat_template(CHAT) != text


def test_messages_carry_any_json(tool_gen):
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": {"n": 1, "x": 2.5}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "call_1"},
    ]
    assert tool_gen.apply_chat_template(messages) == "null||user:[{'type': 'text', 'text': 'hi'}];assistant:;tool:ok;"


@dataclasses.dataclass
class DataMessage:
    role: str
    content: str


class PydanticLike:
    """What the OpenAI client's message objects offer."""

    def model_dump(self) -> dict:
        return {"role": "user", "content": "from model_dump"}


def test_dataclasses_and_models_are_dicts(tool_gen):
    text = tool_gen.apply_chat_template([DataMessage("user", "from a dataclass"), PydanticLike()])
    assert text.endswith("user:from a dataclass;user:from model_dump;")


def test_a_typo_of_a_generation_keyword_is_a_type_error(tool_gen):
    with pytest.raises(TypeError, match="did you mean 'max_new_tokens'"):
        tool_gen.chat(CHAT, max_new_token=3)
    with pytest.raises(TypeError, match="did you mean 'temperature'"):
        tool_gen.stream_chat(CHAT, temprature=0.5)
    # The same name as a template variable, on purpose:
    tool_gen.chat(CHAT, chat_template_kwargs={"max_new_token": 3}, **GREEDY)


def test_values_that_are_not_json_are_named(tool_gen):
    with pytest.raises(TypeError, match=r"tools\[0\]: object is not JSON"):
        tool_gen.chat(CHAT, tools=[object()])
    with pytest.raises(TypeError, match=r"messages\[0\]\[\"content\"\]: set is not JSON"):
        tool_gen.chat([{"role": "user", "content": {1, 2}}])
    with pytest.raises(TypeError, match="keys must be strings"):
        tool_gen.apply_chat_template([{"role": "user", "content": {1: "a"}}])
    with pytest.raises(ValueError, match="not a finite number"):
        tool_gen.apply_chat_template(CHAT, x=float("nan"))
    loop: list = []
    loop.append(loop)
    with pytest.raises(ValueError, match="nested more than 64 deep"):
        tool_gen.apply_chat_template(CHAT, x=loop)
    with pytest.raises(ValueError, match=r"tools\[0\] must be a dict"):
        tool_gen.apply_chat_template(CHAT, tools=["get_weather"])
    with pytest.raises(ValueError, match="documents must be a list of dicts"):
        tool_gen.apply_chat_template(CHAT, documents="text")
    assert tool_gen.chat(CHAT, **GREEDY)


@pytest.mark.parametrize("template, needle", [
    ("{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}"
     "{% endfor %}{% endfor %}{% endfor %}", "instructions"),
    ("{% for a in range(100000) %}{{ 'x' * 1000000 }}{% endfor %}", "bytes"),
])
def test_a_template_without_bounds_is_stopped_and_the_model_stays_usable(tmp_path, template, needle):
    g = Generator(with_template(tmp_path, "gqa_untied", template))
    with pytest.raises(ValueError, match=needle):
        g.chat(CHAT, **GREEDY)
    with pytest.raises(ValueError, match=needle):
        g.apply_chat_template(CHAT)
    assert g.generate("hello", **GREEDY)


def test_granite_3_tool_calls_are_a_list_after_the_marker(tmp_path):
    """A template naming <|tool_call|> asks for Granite 3.x's format; the tiny fixture model writes
    nonsense, but constrained to a call it writes a valid one."""
    template = "{% for m in messages %}{{ m.content }}{% endfor %}{# calls: <|tool_call|>[...] #}"
    g = Generator(with_template(tmp_path, "mha_tied", template))
    tools = [{"type": "function", "function": {"name": "pick", "parameters": {
        "type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9},
                                         "color": {"enum": ["red", "blue"]}},
        "required": ["n", "color"], "additionalProperties": False}}}]
    for seed in range(3):
        r = g.chat(CHAT, tools=tools, tool_choice="required", max_new_tokens=200, details=True, do_sample=True, seed=seed)
        assert r.finish_reason == "stop", r.text
        assert len(r.tool_calls) == 1 and r.tool_calls[0]["name"] == "pick", r.text
        args = r.tool_calls[0]["arguments"]
        assert set(args) == {"n", "color"} and 0 <= args["n"] <= 9 and args["color"] in ("red", "blue")
        assert r.content == ""
