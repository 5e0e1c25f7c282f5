"""Checks that transformers loads a directory written by `granite-rs convert` from the embedded
SmolLM2 GGUF and generates the same greedy tokens as from the GGUF itself.

    granite-rs convert SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR
    python scripts/check_convert.py OUT_DIR      # needs torch and transformers
"""

import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

out_dir = sys.argv[1]
ref = json.loads((Path(__file__).resolve().parent.parent / "tests/fixtures/smollm2_reference.json").read_text())
tok = AutoTokenizer.from_pretrained(out_dir)
model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
print(type(model).__name__)
ok = True
for name, case in ref["prompts"].items():
    if isinstance(case["prompt"], list):
        text = tok.apply_chat_template(case["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(case["prompt"])["input_ids"]
    same_prompt = ids == case["input_ids"]
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=ref["new_tokens"], do_sample=False,
                             min_new_tokens=ref["new_tokens"] if name != "chat" else 0)
    same = gen[0, len(ids):].tolist() == case["greedy_ids"]
    ok &= same and same_prompt
    print(f"{name:6s} prompt ids identical: {same_prompt}  greedy ids identical: {same}")
sys.exit(0 if ok else 1)
