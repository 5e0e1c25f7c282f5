"""The lists defined once in the core agree with everything that repeats them: the stub's
GenerateOptions, the command line's flags and choices, and the README's keyword table."""

import ast
import re
import subprocess
import sys
from pathlib import Path

from granite_rs import _granite_rs
from granite_rs.cli import build_parser, options

ROOT = Path(__file__).resolve().parent.parent
NAMES = [k["name"] for k in _granite_rs.GENERATION_KEYWORDS]


def stub_class_fields(name: str) -> list:
    tree = ast.parse((ROOT / "python/granite_rs/_granite_rs.pyi").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    return [n.target.id for n in cls.body if isinstance(n, ast.AnnAssign)]


def flags_of(command: str) -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices[command]._actions}


def test_keywords_are_unique_and_documented():
    assert len(NAMES) == len(set(NAMES)) and NAMES[0] == "max_new_tokens"
    for k in _granite_rs.GENERATION_KEYWORDS:
        assert k["type"] in ("int", "float", "bool", "strs", "ints", "str", "json"), k
        assert k["doc"] and "\n" not in k["doc"], k


def test_stub_options_are_the_keywords():
    # `details` is a keyword of its own in the stub, since it changes the return type (overloads).
    assert stub_class_fields("GenerateOptions") == [n for n in NAMES if n != "details"]


def test_cli_offers_every_keyword_it_does_not_name_as_left_out():
    for command in ("generate", "chat"):
        dests = flags_of(command)
        for k in _granite_rs.GENERATION_KEYWORDS:
            offered = k["name"] not in options._NOT_OFFERED
            assert (options._dest(k) in dests) == offered, (command, k["name"])


def test_cli_choices_are_the_core_lists():
    quantize = flags_of("generate")["quantize"]
    assert list(quantize.choices) == list(_granite_rs.QUANTIZE_NAMES)
    assert list(flags_of("generate")["matmul_precision"].choices) == list(_granite_rs.MATMUL_PRECISIONS)
    dtype = flags_of("generate")["dtype"]
    for alias, canonical in _granite_rs.DTYPE_NAMES.items():
        assert dtype.type(alias) == canonical


def test_readme_keyword_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    found = re.search(r"<!-- keywords -->\n(.*?)\n<!-- /keywords -->", readme, re.S)
    assert found, "README.md lacks the <!-- keywords --> table"
    script = subprocess.run(
        [sys.executable, str(ROOT / "scripts/keyword_table.py")], capture_output=True, text=True, check=True
    )
    assert found.group(1).strip() == script.stdout.strip(), "regenerate it: python scripts/keyword_table.py"


def test_readme_names_every_quantize_name():
    readme = (ROOT / "README.md").read_text()
    for name in _granite_rs.QUANTIZE_NAMES:
        assert f'"{name}"' in readme, name
