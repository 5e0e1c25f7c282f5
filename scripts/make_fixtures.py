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
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, GraniteConfig, GraniteForCausalLM

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
    # A prompt longer than max_position_embeddings x factor, which transformers runs.
    "rope_dynamic": (
        dict(max_position_embeddings=32, num_key_value_heads=2),
        dict(rope_type="dynamic", factor=4.0, rope_theta=10000.0), dict(layout="5.x", prompt_repeats=3),
    ),
    "bf16": (dict(num_key_value_heads=2), None, dict(layout="4.x", dtype=torch.bfloat16)),
    "sharded": (dict(num_key_value_heads=2, tie_word_embeddings=False), None, dict(layout="5.x", shard="100KB")),
    "llama_like": (
        dict(embedding_multiplier=1.0, residual_multiplier=1.0, logits_scaling=1.0, attention_multiplier=0.25),
        None, dict(layout="4.x"),
    ),
    # The mixtures of experts (model_type in the options), with and without a shared MLP.
    "moe": (
        dict(num_key_value_heads=2, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2),
        None, dict(layout="5.x", model_type="granitemoe"),
    ),
    "moe_shared": (
        dict(intermediate_size=32, num_local_experts=5, num_experts_per_tok=3, shared_intermediate_size=48,
             tie_word_embeddings=False),
        None, dict(layout="4.x", model_type="granitemoeshared"),
    ),
    # granite-4.0-micro's shape: attention only, RoPE, a dense shared MLP (as wide as intermediate_size), no
    # experts.
    "hybrid_dense": (
        dict(num_key_value_heads=2, num_local_experts=0, num_experts_per_tok=0, intermediate_size=96,
             shared_intermediate_size=96,
             position_embedding_type="rope", layer_types=["full_attention", "full_attention"]),
        None, dict(layout="4.x", model_type="granitemoehybrid"),
    ),
    # granite-4.0-h-tiny's shape: Mamba2 and NoPE attention layers, experts and a shared MLP; two
    # groups and chunks of 8, so that the prompt spans several chunks.
    "hybrid_moe": (
        dict(num_hidden_layers=3, num_key_value_heads=2, intermediate_size=32, num_local_experts=4,
             num_experts_per_tok=2, shared_intermediate_size=48, position_embedding_type="nope",
             layer_types=["linear_attention", "full_attention", "linear_attention"],
             mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4, mamba_expand=2,
             mamba_chunk_size=8),
        None, dict(layout="5.x", model_type="granitemoehybrid"),
    ),
    # Two Mamba2 layers before a RoPE one, projection biases, a time-step clamp that binds.
    "hybrid_mamba": (
        dict(num_hidden_layers=3, num_local_experts=0, shared_intermediate_size=64, position_embedding_type="rope",
             layer_types=["linear_attention", "linear_attention", "full_attention"], mamba_n_heads=4, mamba_n_groups=1,
             mamba_d_state=12, mamba_d_conv=3, mamba_expand=1, mamba_chunk_size=16, mamba_proj_bias=True,
             time_step_limit=[0.05, 0.6], tie_word_embeddings=False),
        None, dict(layout="4.x", model_type="granitemoehybrid"),
    ),
    # Attention only without positions (NoPE), experts and a shared MLP.
    "hybrid_nope": (
        dict(num_key_value_heads=1, intermediate_size=32, num_local_experts=3, num_experts_per_tok=2,
             shared_intermediate_size=40, position_embedding_type="nope",
             layer_types=["full_attention", "full_attention"]),
        None, dict(layout="5.x", model_type="granitemoehybrid"),
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


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Weights with O(1) activations, so logits are spread and greedy choices are not near-ties."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if name.endswith("A_log"):  # A = -exp(A_log): decays of every speed
                p.copy_(torch.log(torch.arange(1, p.shape[0] + 1, dtype=torch.float32)) + 0.1 * r)
            elif name.endswith(".D"):
                p.copy_(1.0 + 0.1 * r)
            elif name.endswith("dt_bias"):
                p.copy_(0.5 * r)
            elif p.dim() == 3:  # experts (E, out, in), or the depthwise convolution (C, 1, K)
                p.copy_(r / p.shape[2] ** 0.5)
            elif name.endswith("norm.weight"):
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
    if "layer_types" in cfg:
        kinds = {"linear_attention": "mamba", "full_attention": "attention"}
        cfg["layer_types"] = [kinds[t] for t in cfg["layer_types"]]
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
def reference(model: torch.nn.Module, ids: list[int]) -> dict:
    input_ids = torch.tensor([ids])
    logits = model(input_ids, use_cache=False).logits[0]
    steps, greedy, past, step_input = [], [], None, input_ids
    for _ in range(NEW_TOKENS):
        # Positions given: an all-Mamba cache cannot say its length.
        start = len(ids) + len(greedy) - step_input.shape[1]
        positions = torch.arange(start, start + step_input.shape[1])[None]
        out = model(step_input, past_key_values=past, use_cache=True, position_ids=positions)
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
    model_type = opts.get("model_type", "granite")
    config = AutoConfig.for_model(model_type, **params)
    model = AutoModelForCausalLM.from_config(config)
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
    ref_model = AutoModelForCausalLM.from_pretrained(case_dir, dtype=torch.float32, attn_implementation="eager")
    ref_model.eval()
    ids = tok.encode(PROMPT * opts.get("prompt_repeats", 1)).ids
    ref = reference(ref_model, ids)
    margin = ref.pop("_margin")
    save_file(ref, str(case_dir / "reference.safetensors"))
    print(f"{name:12s} prompt={len(ids)} tokens  min greedy top-2 margin={margin:.4f}")


def sampling_reference(out: Path) -> None:
    """transformers' logits processors on fixed scores, for tests of our own.

    `cases` runs one processor each; `pipelines` runs the list transformers' own
    `_get_logits_processor` builds from a GenerationConfig, so its order is pinned down too.
    """
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        MinPLogitsWarper, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
        TopPLogitsWarper,
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
        ("min_p", 0.05, MinPLogitsWarper(0.05)),
        ("min_p", 0.3, MinPLogitsWarper(0.3)),
        ("min_p", 1.0, MinPLogitsWarper(1.0)),
    ]
    ref = {"scores": scores[0].tolist(), "context": context[0].tolist(), "cases": [], "pipelines": []}
    for name, value, processor in cases:
        result = processor(context, scores.clone())[0]
        ref["cases"].append({"name": name, "value": value, "expected": finite_or_none(result)})

    # A tiny model only to call GenerationMixin._get_logits_processor, which picks and orders them.
    config = GraniteConfig(vocab_size=64, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1)
    model = GraniteForCausalLM(config)
    pipelines = [
        {"do_sample": True, "temperature": 0.5, "top_p": 0.9},
        {"do_sample": True, "temperature": 2.0, "top_p": 0.9},
        {"do_sample": True, "temperature": 1.5, "top_k": 20, "top_p": 0.95, "min_p": 0.05,
         "repetition_penalty": 1.3},
        {"do_sample": True, "temperature": 3.0, "top_p": 0.5, "min_p": 0.3},
        {"do_sample": False, "repetition_penalty": 1.3},
    ]
    for params in pipelines:
        processors = model._get_logits_processor(
            generation_config=GenerationConfig(**params), input_ids_seq_length=context.shape[1],
            encoder_input_ids=context, logits_processor=LogitsProcessorList(), device="cpu", model_kwargs={},
        )
        names = [type(p).__name__ for p in processors]
        result = processors(context, scores.clone())[0]
        ref["pipelines"].append({"params": params, "processors": names, "expected": finite_or_none(result)})
    (out / "sampling_reference.json").write_text(json.dumps(ref) + "\n")


def finite_or_none(scores: torch.Tensor) -> list:
    return [None if x == float("-inf") else x for x in scores.tolist()]


# Modelled on IBM granite-3.1-*-instruct's template, without its `strftime_now` date (the reference must
# not change from day to day): system default, tools/documents/controls branches, roles, loop.last.
GRANITE_3X_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'].strip() %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Knowledge Cutoff Date: April 2024.
You are Granite, developed by IBM." %}
    {%- if tools and documents %}
        {%- set system_message = system_message + " You are a helpful AI assistant with access to the following tools." %}
    {%- elif tools %}
        {%- set system_message = system_message + " You are a helpful AI assistant with access to the following tools. When a tool is required to answer the user's query, respond with <|tool_call|> followed by a JSON list of tools used." %}
    {%- elif documents %}
        {%- set system_message = system_message + " Write the response to the user's input by strictly aligning with the facts in the provided documents." %}
    {%- else %}
        {%- set system_message = system_message + " You are a helpful AI assistant." %}
    {%- endif %}
    {%- if 'citations' in controls and documents %}
        {%- set system_message = system_message + '

In your response, use the symbols <co> and </co> to indicate when a fact comes from a document.' %}
    {%- endif %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>
' }}
{%- if tools %}
    {{- '<|start_of_role|>tools<|end_of_role|>' }}
    {{- tools | tojson(indent=4) }}
    {{- '<|end_of_text|>
' }}
{%- endif %}
{%- for message in loop_messages %}
    {%- if message['role'] == 'assistant' and message['content'].startswith('<|tool_call|>') %}
        {{- '<|start_of_role|>assistant<|end_of_role|><|tool_call|>' + message['content'][13:].strip() + '<|end_of_text|>
' }}
    {%- elif message['role'] == 'assistant' %}
        {{- '<|start_of_role|>assistant<|end_of_role|>' + message['content'].strip() + '<|end_of_text|>
' }}
    {%- else %}
        {{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>
' }}
    {%- endif %}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_of_role|>assistant' }}
        {%- if controls %}
            {{- ' ' + controls | tojson() }}
        {%- endif %}
        {{- '<|end_of_role|>' }}
    {%- endif %}
{%- endfor %}"""

# Plain `{% %}` tags on indented lines (trim_blocks / lstrip_blocks decide the whitespace), namespace,
# a filtered loop, Python string methods, tojson, a printed bool, special tokens, and a trailing newline
# that Jinja drops.
FEATURES_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system='', turns=0) %}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% set ns.system = message.content.strip() %}
    {% endif %}
{% endfor %}
{% if ns.system %}
<<SYS>> {{ ns.system | tojson }} <</SYS>>
{% endif %}
{% for message in messages if message.role != 'system' %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    [{{ loop.index }}/{{ loop.length }}] {{ message.role.upper() }}: {{ message.content | trim }}
    {% if message.role == 'assistant' %}{{ eos_token }}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
[ASSISTANT]
{% endif %}
turns={{ ns.turns }} words={{ (messages | last).content.split() | length }} \
starts={{ messages[0].content.startswith('You') }} first={{ messages[0] | tojson(indent=2) }}
all={{ messages | tojson }}
{{ messages | map(attribute='role') | join(',') }} {{ messages[-1]['content'].replace(' ', '_') }}
"""

# transformers' `tojson` is `json.dumps`: separators, indent, sort_keys, ensure_ascii, float repr, escapes.
TOJSON_TEMPLATE = """{{ messages | tojson(indent=2) }}
{{ messages[-1] | tojson(ensure_ascii=true) }}
{{ messages[0] | tojson(sort_keys=true, separators=(',', ':')) }}
{{ {'n': 3, 'x': 1.5, 'big': 1e20, 'small': 0.00001, 'f': 2.0, 'ok': true, 'no': none, 'e': [], 'd': {}} | tojson }}
{{ {'nested': {'a': [1, [2, {}]], 'b': 'é'}} | tojson(indent=4) }}
{{ 'a "quoted"\tstring' | tojson }} {{ add_generation_prompt | tojson }} {{ add_generation_prompt }} {{ none }}
{% for k, v in messages[0].items() %}{{ k }}={{ v | length }};{% endfor %}
{{ 1.0 }} {{ 1e20 }} {{ 3 / 2 }} {{ 1e-7 }} {{ 7 // 2 }} {{ [1, 'a', "it's", none, true] }} {{ messages[0] }}
"""

# Modelled on granite-3.3-*-instruct's template: the date left out (as above), tools under an
# `available_tools` role, one turn per document, `thinking` and `controls` (citations, hallucinations).
GRANITE_33_TEMPLATE = """{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Knowledge Cutoff Date: April 2024.
You are Granite, developed by IBM." %}
    {%- if tools and documents %}
        {%- set system_message = system_message + " You are a helpful assistant with access to the following tools. When a tool is required to answer the user's query, respond only with <|tool_call|> followed by a JSON list of tools used.

Write the response to the user's input by strictly aligning with the facts in the provided documents." %}
    {%- elif tools %}
        {%- set system_message = system_message + " You are a helpful assistant with access to the following tools. When a tool is required to answer the user's query, respond only with <|tool_call|> followed by a JSON list of tools used." %}
    {%- elif documents %}
        {%- set system_message = system_message + " Write the response to the user's input by strictly aligning with the facts in the provided documents." %}
    {%- elif thinking %}
        {%- set system_message = system_message + " You are a helpful AI assistant.
Respond to every user query in a comprehensive and detailed way. Write your thoughts between <think></think> and write your response between <response></response> for each user query." %}
    {%- else %}
        {%- set system_message = system_message + " You are a helpful AI assistant." %}
    {%- endif %}
    {%- if 'citations' in controls and documents %}
        {%- set system_message = system_message + '

Use the symbols <|start_of_cite|> and <|end_of_cite|> to indicate when a fact comes from a document.' %}
    {%- endif %}
    {%- if 'hallucinations' in controls and documents %}
        {%- set system_message = system_message + '

Finally, after the response is written, include a numbered list of sentences from the response that are potentially hallucinated.' %}
    {%- endif %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- '<|start_of_role|>system<|end_of_role|>' + system_message + '<|end_of_text|>
' }}
{%- if tools %}
    {{- '<|start_of_role|>available_tools<|end_of_role|>' }}
    {{- tools | tojson(indent=4) }}
    {{- '<|end_of_text|>
' }}
{%- endif %}
{%- if documents %}
    {%- for document in documents %}
        {{- '<|start_of_role|>document {"document_id": "' + document['doc_id'] | string + '"}<|end_of_role|>
' }}
        {{- document['text'] }}
        {{- '<|end_of_text|>
' }}
    {%- endfor %}
{%- endif %}
{%- for message in loop_messages %}
    {{- '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + '<|end_of_text|>
' }}
    {%- if loop.last and add_generation_prompt %}
        {{- '<|start_of_role|>assistant' }}
        {%- if controls %}
            {{- ' ' + controls | tojson() }}
        {%- endif %}
        {{- '<|end_of_role|>' }}
    {%- endif %}
{%- endfor %}"""

# Modelled on granite-4.0-*'s template: tools and documents as JSON lines inside XML tags of the
# system turn, content as a string or a list of text parts, assistant `tool_calls` (wrapped in
# `function` or not, arguments as an object or a JSON string), and runs of `tool` turns as one
# user turn of <tool_response>s.
GRANITE_40_TEMPLATE = """{%- set tools_prefix = 'You are a helpful assistant with access to the following tools. You may call one or more tools to assist with the user query.

You are provided with function signatures within <tools></tools> XML tags:
<tools>' %}
{%- set tools_suffix = '
</tools>

For each tool call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call>.' %}
{%- set documents_prefix = 'You are a helpful assistant with access to the following documents.

You are given a list of documents within <documents></documents> XML tags:
<documents>' %}
{%- set documents_suffix = '
</documents>

Write the response to the user\\'s input by strictly aligning with the facts in the provided documents.' %}
{%- set ns = namespace(tools='', documents='', system='') %}
{%- if tools %}
    {%- set ns.tools = tools_prefix %}
    {%- for tool in tools %}
        {%- set ns.tools = ns.tools + '\n' + (tool | tojson) %}
    {%- endfor %}
    {%- set ns.tools = ns.tools + tools_suffix %}
{%- endif %}
{%- if documents %}
    {%- set ns.documents = documents_prefix %}
    {%- for document in documents %}
        {%- set ns.documents = ns.documents + '\n' + (document | tojson) %}
    {%- endfor %}
    {%- set ns.documents = ns.documents + documents_suffix %}
{%- endif %}
{%- if messages[0].role == 'system' %}
    {%- set ns.system = messages[0].content %}
{%- endif %}
{%- for part in [ns.tools, ns.documents] if part %}
    {%- set ns.system = (ns.system + '\n\n' + part) if ns.system else part %}
{%- endfor %}
{{- '<|start_of_role|>system<|end_of_role|>' + (ns.system or 'You are a helpful assistant. Please ensure responses are professional, accurate, and safe.') + '<|end_of_text|>\n' }}
{%- for message in messages %}
    {%- set content = namespace(val='') %}
    {%- if message.content is string %}
        {%- set content.val = message.content %}
    {%- elif message.content is iterable %}
        {%- for entry in message.content if entry.type == 'text' %}
            {%- set content.val = content.val + ('\n' if content.val else '') + entry.text %}
        {%- endfor %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|start_of_role|>' + message.role + '<|end_of_role|>' + content.val + '<|end_of_text|>\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|start_of_role|>assistant<|end_of_role|>' + content.val }}
        {%- for call in message.tool_calls or [] %}
            {%- if content.val or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {%- if call.function %}
                {%- set call = call.function %}
            {%- endif %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {%- if call.arguments is string %}
                {{- call.arguments }}
            {%- else %}
                {{- call.arguments | tojson }}
            {%- endif %}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|end_of_text|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|start_of_role|>user<|end_of_role|>' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content.val + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|end_of_text|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_of_role|>assistant<|end_of_role|>' }}
{%- endif %}"""

# What a template receives: messages after transformers' normalization (keys set to None dropped,
# reasoning fields aliased), keywords of any JSON type, a keyword that replaces a special token.
VARIABLES_TEMPLATE = """{{ messages | tojson }}
{{ tools | tojson }} {{ documents | tojson }} {{ thinking }} {{ controls | tojson }} {{ bos_token }} {{ eos_token }}
{% for m in messages %}{{ m.role }}:{{ m.thinking }}|{{ m.reasoning_content }}|{{ 'content' in m }};{% endfor %}
{{ extra.nested[1].x * 2 }} {{ extra.flag }} {{ extra.pi }} {{ extra.big }}
"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "The city's name, e.g. « Zürich »."},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "description": "Searches the web.",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                "threshold": {"type": "number", "minimum": 0.5},
            },
            "required": ["query", "limit"],
        },
    },
}
TOOLS = [WEATHER_TOOL, SEARCH_TOOL]
DOCUMENTS = [
    {"doc_id": 1, "title": "Paris", "text": "Paris is the capital of France."},
    {"doc_id": "b2", "title": "Lyon", "text": "Lyon — « gastronomie » 🦊\nsecond line"},
]

# A tool call and its results: arguments as an object (one wrapped in `function`, OpenAI style),
# as a JSON string, content None, two tool results in a row.
TOOL_CONVERSATIONS = [
    [
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}},
            {"name": "get_weather", "arguments": "{\"city\": \"Lyon\"}"},
        ]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 18.5}"},
        {"role": "tool", "content": "{\"temp\": 21}"},
        {"role": "user", "content": "Thanks!"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "image"},
                                     {"type": "text", "text": "Part two."}]},
        {"role": "assistant", "content": "Let me search.", "tool_calls": [
            {"function": {"name": "search", "arguments": {"query": "granite", "limit": 3}}}]},
        {"role": "tool", "content": "nothing found"},
    ],
]

CHAT_CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a terse assistant.  "},
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "  4\n"},
        {"role": "user", "content": "And 3 + 3?"},
    ],
    [
        {"role": "user", "content": "Traduis : « où est la bibliothèque ? » 你好，世界 🦊"},
        {"role": "assistant", "content": "Voilà — \"quotes\", a back\\slash,\ta tab\nand a new line. 🚀"},
        {"role": "user", "content": "Merci ! ✨"},
    ],
    [{"role": "system", "content": "Système : réponds en français."}, {"role": "user", "content": "Bonjour"}],
    [{"role": "user", "content": "bell\u0007 del\u007f unit\u001f fox 🦊 é\r\n"}],
]


# (template, conversations, variables): transformers' `tools=`, `documents=` and other keywords.
VARIABLE_CASES = [
    (GRANITE_33_TEMPLATE, CHAT_CONVERSATIONS[:2], [
        {}, {"tools": TOOLS}, {"documents": DOCUMENTS}, {"tools": TOOLS, "documents": DOCUMENTS},
        {"thinking": True}, {"documents": DOCUMENTS, "controls": {"citations": True, "hallucinations": True}},
        {"controls": {"length": "short", "originality": "abstractive"}},
    ]),
    (GRANITE_40_TEMPLATE, CHAT_CONVERSATIONS[:2] + TOOL_CONVERSATIONS, [
        {}, {"tools": TOOLS}, {"documents": DOCUMENTS}, {"tools": TOOLS, "documents": DOCUMENTS},
    ]),
    (VARIABLES_TEMPLATE, [[
        {"role": "user", "content": "Hi", "name": None},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "assistant", "reasoning": "r2", "content": None, "thinking": "t2"},
    ]], [
        {"thinking": False, "controls": {"citations": True}, "bos_token": "<B>",
         "extra": {"nested": [0, {"x": 21}], "flag": None, "pi": 3.25, "big": 12345678901234}},
        {"tools": TOOLS[:1], "documents": DOCUMENTS[:1], "thinking": True, "controls": [], "extra": {"nested": [1, {"x": 0.5}], "flag": True, "pi": 1e-7, "big": -1}},
    ]),
]


def chat_reference(out: Path) -> None:
    """Chat templates rendered by transformers' own renderer (`apply_chat_template`, tokenize=False)."""
    from transformers import AutoTokenizer

    templates = [("mha_tied", None), ("gqa_untied", None), ("mha_tied", GRANITE_3X_TEMPLATE),
                 ("gqa_untied", FEATURES_TEMPLATE), ("mha_tied", TOJSON_TEMPLATE)]
    cases = []
    for fixture, template in templates:
        tok = AutoTokenizer.from_pretrained(out / fixture)
        for messages in CHAT_CONVERSATIONS:
            for add_generation_prompt in (False, True):
                expected = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=add_generation_prompt, chat_template=template
                )
                cases.append(dict(template=template, fixture=fixture, messages=messages,
                                  add_generation_prompt=add_generation_prompt, expected=expected))
    tok = AutoTokenizer.from_pretrained(out / "mha_tied")
    for template, conversations, variants in VARIABLE_CASES:
        for messages in conversations:
            for variables in variants:
                expected = tok.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=True, chat_template=template, **variables
                )
                cases.append(dict(template=template, fixture="mha_tied", messages=messages,
                                  add_generation_prompt=True, variables=variables, expected=expected))
    (out / "chat_reference.json").write_text(json.dumps({"cases": cases}, ensure_ascii=False, indent=1) + "\n")
    print(f"chat_reference: {len(cases)} cases")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    parser.add_argument("--only", choices=["chat", "sampling"],
                        help="write only this reference, from the fixtures already built")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), help="rebuild only these model cases")
    args = parser.parse_args()
    if args.cases:
        tok = train_tokenizer()
        for seed, name in enumerate(CASES):
            if name in args.cases:
                build_case(args.out, name, tok, seed)
        return
    if args.only == "chat":
        chat_reference(args.out)
        return
    if args.only == "sampling":
        sampling_reference(args.out)
        return
    tok = train_tokenizer()
    for seed, name in enumerate(CASES):
        build_case(args.out, name, tok, seed)
    sampling_reference(args.out)
    chat_reference(args.out)


if __name__ == "__main__":
    main()
