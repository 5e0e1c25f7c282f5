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


def test_dropping_a_generator_frees_its_memory(tmp_path):
    """About 190 MiB of float32 weights, copied out of the memory-mapped file into tensors when
    loaded: RSS rises by about that much and falls back when the Generator is dropped."""
    model_dir = make_checkpoint(tmp_path / "big", vocab_size=384, hidden_size=1024, intermediate_size=4096,
                                num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=8)
    size = (model_dir / "model.safetensors").stat().st_size
    baseline = rss()
    g = Generator(model_dir)
    g.generate_ids([1, 2, 3], max_new_tokens=2)
    loaded = rss()
    del g
    freed = rss()
    print(f"weights {size / MiB:.0f} MiB: RSS +{(loaded - baseline) / MiB:.0f} MiB loaded, "
          f"{(freed - baseline) / MiB:+.0f} MiB after del")
    assert loaded - baseline > size / 2
    assert freed - baseline < GROWTH_LIMIT
