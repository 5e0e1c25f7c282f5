"""Convert HF fixtures to GGUFs with llama.cpp's own converter (convert_hf_to_gguf.py).

Needs what the converter imports: torch, transformers, numpy and sentencepiece; llama.cpp's
bundled gguf-py is used, not an installed `gguf`. The outputs are committed, so the tests need
neither torch nor llama.cpp:

    python scripts/make_granite_gguf.py [LLAMA_CPP_DIR | --sdist PATH] [--out tests/fixtures/granite_gguf]

LLAMA_CPP_DIR is a llama.cpp source tree, e.g. vendor/llama.cpp of the unpacked llama-cpp-python
sdist. Without it the pinned sdist (SDIST, checked against SDIST_SHA256) is unpacked into a
temporary directory: the file given by --sdist, or else the one pip's own client fetches by name
(`python -m pip download --no-deps --no-binary llama-cpp-python llama-cpp-python==0.3.36`: the sdist only, its build tools as wheels).
Each fixture in CASES becomes `<case>.gguf` (f32 tensors), of the architecture CASES names: the
mixtures of experts are `granitemoe`; an all-attention Granite 4.0 without experts (`hybrid_dense`)
is `granite`, with `head_count_kv` per layer.

Our fixtures' tokenizer has a pre-tokenizer hash the converter does not know. It is GPT-2's
(ByteLevel with its regex, no prefix space), so the converter's hash lookup is replaced by the
answer `gpt-2` after checking that tokenizer.json says so.
"""

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CASES = {"mha_tied": "granite", "gqa_untied": "granite", "moe": "granitemoe", "moe_shared": "granitemoe",
         "hybrid_dense": "granite", "hybrid_moe": "granitehybrid"}
SDIST = "llama-cpp-python==0.3.36"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
GRANITE_KEYS = ["embedding_scale", "residual_scale", "attention.scale", "logit_scale"]


def download_sdist(tmp: Path) -> Path:
    """The pinned sdist, fetched by name with pip's own client (no wheel, no dependencies) into ``tmp``."""
    dest = tmp / "download"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-python", SDIST, "-d", str(dest)]
    subprocess.run(cmd, check=True)
    archives = sorted(dest.glob("llama_cpp_python-*.tar.gz"))
    if len(archives) != 1:
        sys.exit(f"pip download {SDIST}: expected one sdist in {dest}, found {[a.name for a in archives]}")
    return archives[0]


def unpack_llama_cpp(archive: Path, tmp: Path) -> Path:
    """The pinned llama-cpp-python sdist ``archive``, checked and unpacked; its vendored llama.cpp tree."""
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SDIST_SHA256:
        sys.exit(f"{archive}: sha256 {digest} != {SDIST_SHA256} ({SDIST})")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    return next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))


def check_gpt2_pre_tokenizer(case_dir: Path) -> None:
    pre = json.loads((case_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    expected = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    if any(pre.get(k) != v for k, v in expected.items()):
        sys.exit(f"{case_dir}: pre-tokenizer {pre} is not GPT-2's")


def with_4x_layer_types(case_dir: Path, tmp: Path) -> Path:
    """``case_dir``, or a copy whose ``layer_types`` use the 4.x names: the converter knows
    attention layers only as ``"attention"`` (as the published checkpoints write them) and takes a
    5.x ``"full_attention"`` layer for a Mamba2 one."""
    config = json.loads((case_dir / "config.json").read_text())
    kinds = {"full_attention": "attention", "linear_attention": "mamba"}
    if not any(t in kinds for t in config.get("layer_types", [])):
        return case_dir
    copy = tmp / case_dir.name
    shutil.copytree(case_dir, copy)
    config["layer_types"] = [kinds.get(t, t) for t in config["layer_types"]]
    (copy / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return copy


def convert(case: str, out: Path, tmp: Path) -> Path:
    import convert_hf_to_gguf
    from conversion.base import TextModel

    case_dir = with_4x_layer_types(FIXTURES / case, tmp)
    check_gpt2_pre_tokenizer(case_dir)
    TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
    path = out / f"{case}.gguf"
    sys.argv = ["convert_hf_to_gguf.py", str(case_dir), "--outtype", "f32", "--outfile", str(path)]
    convert_hf_to_gguf.main()
    return path


def check(path: Path, expected: str) -> None:
    """The keys our loader reads, printed; exits unless this GGUF has the expected architecture
    and Granite's scalars."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    arch = reader.get_field("general.architecture").contents()
    keys = GRANITE_KEYS + ["attention.head_count_kv", "expert_count", "expert_used_count",
                           "expert_shared_feed_forward_length"]
    fields = {k: reader.get_field(f"{arch}.{k}") for k in keys}
    if arch != expected or any(fields[k] is None for k in GRANITE_KEYS):
        sys.exit(f"{path}: architecture {arch} (expected {expected}), fields {fields}")
    print(f"{path.name}: {path.stat().st_size} bytes, general.architecture = {arch}")
    for k, field in fields.items():
        if field is not None:
            print(f"  {arch}.{k} = {field.contents()}")
    print(f"  tokenizer.ggml.pre = {reader.get_field('tokenizer.ggml.pre').contents()}")
    print(f"  tensors: {sorted({t.tensor_type.name for t in reader.tensors})}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("llama_cpp", type=Path, nargs="?", help="llama.cpp source tree (default: the pinned sdist's)")
    parser.add_argument("--sdist", type=Path, metavar="PATH",
                        help=f"an already downloaded sdist of {SDIST} (default: pip download)")
    parser.add_argument("--out", type=Path, default=FIXTURES / "granite_gguf")
    args = parser.parse_args()
    if args.llama_cpp and args.sdist:
        parser.error("give LLAMA_CPP_DIR or --sdist, not both")
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        if args.llama_cpp:
            llama_cpp = args.llama_cpp.resolve()
        else:
            archive = args.sdist.resolve() if args.sdist else download_sdist(Path(tmp))
            llama_cpp = unpack_llama_cpp(archive, Path(tmp)).resolve()
        sys.path[:0] = [str(llama_cpp), str(llama_cpp / "gguf-py")]
        for case, arch in CASES.items():
            check(convert(case, args.out.resolve(), Path(tmp)), arch)


if __name__ == "__main__":
    main()
