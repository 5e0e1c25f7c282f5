"""HF Hub ids, with no network: a temporary HF cache laid out as huggingface_hub lays it out
(`models--org--name/refs/main` naming a snapshot of blobs), read with HF_HUB_OFFLINE=1."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub  # noqa: F401  (scripts/test.sh installs it: a test dependency, not skipped without)
import pytest

FIXTURES = Path(__file__).parent / "fixtures"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_repo(cache: Path, repo: str, files: dict, commit: str = COMMIT, ref: str = "main") -> None:
    """Puts `files` (name -> source path) into the cache as one snapshot of `repo`."""
    root = cache / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / ref).write_text(commit)
    for name, src in files.items():
        blob = root / "blobs" / f"{abs(hash((name, str(src)))):x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, blob)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))


def run(code: str, cache: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("hf-cache")
    cache_repo(cache, "org/tiny", {f.name: f for f in (FIXTURES / "gqa_untied").iterdir() if f.is_file()})
    ggufs = FIXTURES / "granite_gguf"
    cache_repo(cache, "org/tiny-GGUF", {"tiny.Q8_0.gguf": ggufs / "gqa_untied.gguf",
                                         "other/moe.gguf": ggufs / "moe.gguf", "README.md": ggufs / "moe.gguf"})
    cache_repo(cache, "org/tiny", {f.name: f for f in (FIXTURES / "mha_tied").iterdir() if f.is_file()},
               commit="f" * 40, ref="v2")
    return cache


def test_hub_ids_load_from_the_cache_offline(cache):
    out = run(f"""
from granite_rs import Generator
local = Generator({str(FIXTURES / 'gqa_untied')!r})
hub = Generator("org/tiny")
assert hub.generate("hello", max_new_tokens=8) == local.generate("hello", max_new_tokens=8)
gguf = Generator("org/tiny-GGUF", filename="*Q8_0.gguf")
assert gguf.model_info["format"] == "GGUF file"
assert Generator("org/tiny", revision="v2").model_info["num_hidden_layers"] == Generator({str(FIXTURES / 'mha_tied')!r}).model_info["num_hidden_layers"]
print("ok")
""", cache)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("code, needle", [
    ('Generator("org/tiny-GGUF")', "has no config.json; it holds ['tiny.Q8_0.gguf']: pass filename="),
    ('Generator("org/tiny-GGUF", filename="*.gguf")', "must match one file, matched ['other/moe.gguf', 'tiny.Q8_0.gguf']"),
    ('Generator("org/tiny-GGUF", filename="*Q4_K_M.gguf")', "matched none"),
    ('Generator("org/missing")', "LocalEntryNotFoundError"),
    (f'Generator({str(FIXTURES / "gqa_untied")!r}, filename="x")', "filename and revision are for HF Hub ids"),
])
def test_bad_hub_arguments_are_clear_errors(cache, code, needle):
    out = run(f"from granite_rs import Generator\n{code}", cache)
    assert out.returncode != 0 and needle in out.stderr, out.stderr


def test_cli_takes_hub_ids(cache):
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    cli = [sys.executable, "-m", "granite_rs"]
    out = subprocess.run([*cli, "info", "--model", "org/tiny-GGUF", "--model-file", "*Q8_0.gguf", "--json"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["format"] == "GGUF file"
    out = subprocess.run([*cli, "generate", "-m", "org/tiny", "-n", "4", "hello"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    bad = subprocess.run([*cli, "generate", "-m", "org/tiny-GGUF", "hello"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert bad.returncode != 0 and "pass filename=" in bad.stderr
