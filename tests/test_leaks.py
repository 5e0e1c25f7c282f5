"""Long runs keep memory flat: many generations and session cycles do not grow the resident set,
and dropping a Generator gives its memory back. RSS is read from /proc/self/status (Linux)."""

from __future__ import annotations

import gc
import sys
from pathlib import Path

import pytest

from conftest import make_checkpoint
from granite_rs import Generator

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")

FIXTURES = Path(__file__).parent / "fixtures"
MiB = 1 << 20
GROWTH_LIMIT = 20 * MiB


def rss() -> int:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.fixture(scope="module")
def gen() -> Generator:
    return Generator(FIXTURES / "gqa_untied")


def growth(work, calls: int, warmup: int) -> int:
    """RSS growth over `calls` runs of work(i), measured after `warmup` runs."""
    for i in range(warmup):
        work(i)
    before = rss()
    for i in range(calls):
        work(i)
    return rss() - before


def test_many_generations_keep_rss_flat(gen):
    def work(i: int) -> None:
        gen.generate(f"Call {i}: the quick brown fox", max_new_tokens=4, ignore_eos=True)

    grown = growth(work, calls=2000, warmup=100)
    print(f"2000 generate calls: RSS grew {grown / MiB:+.2f} MiB")
    assert grown < GROWTH_LIMIT


def test_session_cycles_keep_rss_flat(gen):
    def work(i: int) -> None:
        s = gen.session()
        s.generate(f"Turn {i}", max_new_tokens=4, ignore_eos=True)
        s.fork().generate(f"Turn {i} and more", max_new_tokens=4, ignore_eos=True)
        del s

    grown = growth(work, calls=200, warmup=10)
    print(f"200 session create/generate/fork/drop cycles: RSS grew {grown / MiB:+.2f} MiB")
    assert grown < GROWTH_LIMIT


def rss_parts() -> tuple[int, int]:
    """(anonymous, file-backed) resident bytes."""
    gc.collect()
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines() if ":" in line)
    return int(fields["RssAnon"].split()[0]) * 1024, int(fields["RssFile"].split()[0]) * 1024


def test_weights_stay_in_the_mapped_file_and_dropping_frees_them(tmp_path):
    """About 190 MiB of float32 weights, used in place from the memory-mapped file: loading
    copies none of them into the process's own (anonymous) memory; reading them all (a forward)
    makes them resident as file pages; dropping the Generator unmaps them."""
    model_dir = make_checkpoint(tmp_path / "big", vocab_size=384, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8)
    size = (model_dir / "model.safetensors").stat().st_size
    anon0, file0 = rss_parts()
    g = Generator(model_dir)
    assert g.mapped_weight_bytes == g.weight_bytes > size * 0.99
    g.generate_ids([1, 2, 3], max_new_tokens=2)
    anon1, file1 = rss_parts()
    del g
    anon2, file2 = rss_parts()
    print(f"weights {size / MiB:.0f} MiB: loaded and run, anonymous RSS {(anon1 - anon0) / MiB:+.0f} MiB, "
          f"file-backed {(file1 - file0) / MiB:+.0f} MiB; after del {(anon2 - anon0) / MiB:+.0f} and "
          f"{(file2 - file0) / MiB:+.0f} MiB")
    assert anon1 - anon0 < GROWTH_LIMIT
    assert file1 - file0 > size * 0.9
    assert anon2 - anon0 < GROWTH_LIMIT and file2 - file0 < GROWTH_LIMIT
