"""Build tiny random-weight Granite checkpoints and HF transformers reference outputs.

Run once with torch + transformers installed; the outputs under tests/fixtures/ are committed
so tests never need torch:

    python scripts/make_fixtures.py [--out tests/fixtures]

Each case directory is a complete HF model directory plus `reference.safetensors`:
  input_ids   (n,)        i64  the prompt
  logits      (n, vocab)  f32  one uncached forward over the prompt
  greedy_ids  (32,)       i64  greedy tokens from a cached HF decode loop
  step_logits (32, vocab) f32  the logits each greedy token was chosen from
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GenerationConfig, GraniteConfig, GraniteForCausalLM

NEW_TOKENS = 32
SPECIAL = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|pad|>"]
EOS, PAD = 0, 3

CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif %}"
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Granite models are decoder-only transformers trained by IBM.",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)\n",
    "Paris is the capital of France. Rome is the capital of Italy.",
    "你好，世界！今天天气很好。",
    "Emoji make tokenizers split bytes: 🦊🚀✨ café naïve déjà vu.",
    "Numbers 0123456789 and symbols #$%&*()[]{}<>.",
] * 20

PROMPT = "The quick brown fox likes 你好 and 🦊. def main(): return 42"

# Granite 3.x scalars, far from 1.0 so that a forgotten multiplier shows.
GRANITE = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625, logits_scaling=8.0)
BASE = dict(
    vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
    rms_norm_eps=1e-5, bos_token_id=EOS, eos_token_id=EOS, pad_token_id=PAD,
    tie_word_embeddings=True, **GRANITE,
)

# name -> (config overrides, rope parameters, options)
CASES = {
    "mha_tied": ({}, None, dict(layout="4.x")),
    "gqa_untied": (dict(num_key_value_heads=2, tie_word_embeddings=False), None, dict(layout="5.x")),
    "mqa_bias": (
        dict(num_key_value_heads=1, attention_bias=True, mlp_bias=True, eos_token_id=[EOS, 1]),
        None, dict(layout="4.x"),
    ),
    "rope_linear": ({}, dict(rope_type="linear", factor=2.0, rope_theta=500.0), dict(layout="4.x")),
    "rope_dynamic": (
        dict(max_position_embeddings=32, num_key_value_heads=2),
        dict(rope_type="dynamic", factor=4.0, rope_theta=10000.0), dict(layout="5.x"),
    ),
    "bf16": (dict(num_key_value_heads=2), None, dict(layout="4.x", dtype=torch.bfloat16)),
    "sharded": (dict(num_key_value_heads=2, tie_word_embeddings=False), None, dict(layout="5.x", shard="100KB")),
    "llama_like": (
        dict(embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0, attention_multiplier=0.25),
        None, dict(layout="4.x"),
    ),
}


def train_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def randomize(model: GraniteForCausalLM, seed: int) -> None:
    """Weights with O(1) activations, so logits are spread and greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("bias"):
                p.copy_(0.1 * r)
            elif "embed_tokens" in name or "lm_head" in name:
                p.copy_(r)
            else:
                p.copy_(r / p.shape[1] ** 0.5)


def to_4x_layout(config_path: Path) -> None:
    """Rewrite a transformers 5.x config.json in the 4.x layout of the published Granite checkpoints."""
    cfg = json.loads(config_path.read_text())
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] != "default":
        cfg["rope_scaling"] = {"type": rope["rope_type"], "factor": rope["factor"]}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.46.0"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")


def write_tokenizer_files(out: Path, tok: Tokenizer, layout: str) -> None:
    tok.save(str(out / "tokenizer.json"))
    tcfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": SPECIAL[EOS], "eos_token": SPECIAL[EOS], "pad_token": SPECIAL[PAD],
        "model_max_length": 128,
    }
    if layout == "4.x":
        tcfg["chat_template"] = CHAT_TEMPLATE
    else:
        (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2) + "\n")


@torch.no_grad()
def reference(model: GraniteForCausalLM, ids: list[int]) -> dict:
    input_ids = torch.tensor([ids])
    logits = model(input_ids, use_cache=False).logits[0]
    steps, greedy, past, step_input = [], [], None, input_ids
    for _ in range(NEW_TOKENS):
        out = model(step_input, past_key_values=past, use_cache=True)
        past = out.past_key_values
        last = out.logits[0, -1]
        steps.append(last)
        greedy.append(int(last.argmax()))
        step_input = torch.tensor([[greedy[-1]]])
    step_logits = torch.stack(steps)
    top2 = step_logits.topk(2, dim=-1).values
    return {
        "input_ids": input_ids[0].numpy(),
        "logits": logits.float().numpy(),
        "greedy_ids": torch.tensor(greedy).numpy(),
        "step_logits": step_logits.float().numpy(),
        "_margin": float((top2[:, 0] - top2[:, 1]).min()),
    }


def build_case(out: Path, name: str, tok: Tokenizer, seed: int) -> None:
    overrides, rope, opts = CASES[name]
    params = {**BASE, **overrides}
    params["rope_parameters"] = rope or dict(rope_type="default", rope_theta=10000.0)
    config = GraniteConfig(**params)
    model = GraniteForCausalLM(config)
    randomize(model, seed)
    dtype = opts.get("dtype", torch.float32)
    model = model.to(dtype)

    case_dir = out / name
    shutil.rmtree(case_dir, ignore_errors=True)
    case_dir.mkdir(parents=True)
    model.save_pretrained(case_dir, max_shard_size=opts.get("shard", "1GB"))
    GenerationConfig(bos_token_id=EOS, eos_token_id=config.eos_token_id, pad_token_id=PAD).save_pretrained(case_dir)
    if opts["layout"] == "4.x":
        to_4x_layout(case_dir / "config.json")
    write_tokenizer_files(case_dir, tok, opts["layout"])

    # The reference runs on what we wrote, read back the way transformers reads it, in f32.
    ref_model = GraniteForCausalLM.from_pretrained(case_dir, dtype=torch.float32, attn_implementation="eager")
    ref_model.eval()
    ids = tok.encode(PROMPT).ids
    ref = reference(ref_model, ids)
    margin = ref.pop("_margin")
    save_file(ref, str(case_dir / "reference.safetensors"))
    print(f"{name:12s} prompt={len(ids)} tokens  min greedy top-2 margin={margin:.4f}")


def sampling_reference(out: Path) -> None:
    """transformers' logits processors on fixed scores, for tests of our own."""
    from transformers.generation.logits_process import (
        RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(7)
    scores = torch.randn(1, 64, generator=g) * 3
    scores[0, 5] = scores[0, 9]  # a tie, to pin down top-k's tie rule
    context = torch.tensor([[3, 5, 5, 17, 40, 63]])
    cases = [
        ("repetition_penalty", 1.3, RepetitionPenaltyLogitsProcessor(1.3)),
        ("temperature", 0.7, TemperatureLogitsWarper(0.7)),
        ("top_k", 5, TopKLogitsWarper(5)),
        ("top_k", 1, TopKLogitsWarper(1)),
        ("top_p", 0.9, TopPLogitsWarper(0.9)),
        ("top_p", 0.3, TopPLogitsWarper(0.3)),
        ("top_p", 0.01, TopPLogitsWarper(0.01)),
    ]
    ref = {"scores": scores[0].tolist(), "context": context[0].tolist(), "cases": []}
    for name, value, processor in cases:
        result = processor(context, scores.clone())[0]
        expected = [None if x == float("-inf") else x for x in result.tolist()]
        ref["cases"].append({"name": name, "value": value, "expected": expected})
    (out / "sampling_reference.json").write_text(json.dumps(ref) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = parser.parse_args()
    tok = train_tokenizer()
    for seed, name in enumerate(CASES):
        build_case(args.out, name, tok, seed)
    sampling_reference(args.out)


if __name__ == "__main__":
    main()
