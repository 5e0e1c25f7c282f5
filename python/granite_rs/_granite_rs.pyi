"""Type stubs and user documentation for the native module."""

from collections.abc import Iterator, Mapping, Sequence
from os import PathLike
from typing import Any, Literal, Optional, Union, final, overload, type_check_only

import numpy as np
import numpy.typing as npt
from typing_extensions import Self, TypedDict, Unpack, disjoint_base

__all__ = [
    "DTYPE_NAMES", "GENERATION_KEYWORDS", "GenerationResult", "Generator", "GraniteError", "MATMUL_PRECISIONS", "QUANTIZE_NAMES", "Session",
    "TextStream", "_Generates", "convert_gguf", "__version__",
]
__version__: str

# A chat message: {"role": "system" | "user" | "assistant" | "tool" | ..., "content": ..., ...}.
_Message = Mapping[str, Any]

GENERATION_KEYWORDS: tuple[dict[str, Any], ...]
"""The keywords of generate, stream and chat (``GenerateOptions`` and ``details``), in order.

Each a dict: ``name``; ``type`` ("int", "float", "bool", "strs": one string or a list of them,
"ints": a list of ints); ``default``; ``nullable`` (whether None is accepted, meaning the
default); ``range`` (the values accepted, for people); ``doc`` (one line)."""
QUANTIZE_NAMES: tuple[str, ...]
MATMUL_PRECISIONS: tuple[str, ...]
"""The values of ``Generator``'s ``quantize``."""
DTYPE_NAMES: dict[str, str]
"""The names ``Generator``'s ``dtype`` accepts, each to its canonical name."""

def convert_gguf(src: Union[str, PathLike[str]], out_dir: Union[str, PathLike[str]]) -> None:
    """Writes an HF model directory from a GGUF file (architectures llama and granite):
    config.json as GraniteForCausalLM (every Granite scalar explicit), generation_config.json,
    model.safetensors in float32, tokenizer.json and tokenizer_config.json with the chat template.
    transformers loads the result and generates the same greedy tokens as from the GGUF."""

class GraniteError(Exception):
    """A model that cannot be loaded or run: bad config, weights, tokenizer or chat template,
    numerical failure. Missing files raise ``FileNotFoundError`` and bad arguments ``ValueError``.
    """

@type_check_only
class GenerateOptions(TypedDict, total=False):
    """Keywords of every generating method; transformers' names and meaning.

    A keyword left out takes its value from the model's generation_config.json, else the default
    below. Processors run in transformers' order: repetition_penalty, presence_penalty and
    frequency_penalty, then, when sampling, temperature, top_k, top_p, min_p.
    """

    max_new_tokens: Optional[int]
    """How many tokens to generate at most (default 256); None means the default."""
    do_sample: bool
    """Sample instead of taking the most likely token (default False)."""
    temperature: float
    """Divides the logits before sampling; > 0 (default 1.0)."""
    top_k: Optional[int]
    """Sample among the k most likely tokens only; None or 0: off."""
    top_p: Optional[float]
    """Sample among the most likely tokens whose probabilities add up to top_p, in (0, 1]; None: off."""
    min_p: Optional[float]
    """In [0, 1]: drop tokens less likely than min_p times the most likely one; None: off."""
    repetition_penalty: Optional[float]
    """> 0; above 1 makes tokens already in the sequence less likely (greedy too); None: off."""
    presence_penalty: Optional[float]
    """In [-2, 2]: subtracted once from the logit of every token already generated (as OpenAI)."""
    frequency_penalty: Optional[float]
    """In [-2, 2]: subtracted from a token's logit once per time it was generated (as OpenAI)."""
    seed: Optional[int]
    """In [0, 2**64): makes sampling reproducible, whatever other calls or threads do."""
    stop: Union[str, Sequence[str], None]
    """Stop strings, matched on the text even across tokens, never included in the result."""
    stop_token_ids: Optional[Sequence[int]]
    """Token ids that end the generation (finish reason "stop")."""
    ignore_eos: bool
    """Keep going past end-of-sequence tokens (default False)."""
    json_schema: Union[Mapping[str, Any], str, None]
    """A JSON schema (a dict, or a JSON string): the text is one JSON value valid under it.

    Each token is masked to those that can continue a valid value before sampling (llguidance,
    as vLLM and mistral.rs use), so every sampling keyword still applies; the generation stops
    (finish reason "stop") once the value is complete. Unless the schema sets llguidance's own
    ``"x-guidance"`` options, the JSON is laid out as ``json.dumps`` writes it (``", "`` and
    ``": "``, no other whitespace). A result cut short by ``max_new_tokens`` ends with finish
    reason "length" and is not complete. A schema that does not compile raises ValueError."""
    regex: Optional[str]
    """The whole text matches this regex (as ``re.fullmatch``); see ``json_schema``."""
    grammar: Optional[str]
    """The text matches this context-free grammar in llguidance's Lark syntax (rule ``start``);
    see ``json_schema``. At most one of ``json_schema``, ``regex`` and ``grammar`` per call."""
    top_logprobs: int
    """With ``details=True``: also report this many most likely alternatives per token."""

@final
class TextStream(Iterator[str]):
    """Text chunks of one generation, each yielded as soon as it is certain.

    ``"".join(stream)`` equals what ``generate`` returns for the same arguments; a chunk never
    ends in half a character, and only text that could still become a stop string is held back.
    Dropping the iterator (``break``) stops the work; ``cancel()`` stops it from any thread
    within one layer's forward, after which the iterator ends.
    """

    def __iter__(self) -> TextStream: ...
    def __next__(self) -> str: ...
    def cancel(self) -> None:
        """Stops the work (from any thread) within one layer's forward; the iterator then ends."""
    @property
    def token_ids(self) -> list[int]:
        """The new token ids generated so far."""
    @property
    def finish_reason(self) -> Optional[Literal["eos", "stop", "length"]]:
        """Why the generation ended, or None while it runs."""
    @property
    def logprobs(self) -> list[float]:
        """Each new token's log-probability so far (when ``top_logprobs`` is given, 0 included; else empty)."""
    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        """Per new token so far, the ``top_logprobs`` most likely (token id, log-probability) pairs."""
    @property
    def prompt_tokens(self) -> int:
        """The prompt's tokens, once finished (0 before)."""
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens not computed again (a session's cache, or ``prefix_caching``), once finished."""
    @property
    def tool_calls(self) -> Optional[list[dict[str, Any]]]:
        """For ``stream_chat`` with ``tools``: the tool calls complete so far; otherwise None."""
    @property
    def content(self) -> Optional[str]:
        """For ``stream_chat`` with ``tools``: the text so far outside the complete tool calls;
        otherwise None."""

@final
class GenerationResult:
    """What ``generate(..., details=True)`` and ``chat(..., details=True)`` return."""

    @property
    def text(self) -> str: ...
    @property
    def token_ids(self) -> list[int]:
        """The new token ids (an end-of-sequence token that ended the generation included)."""
    @property
    def finish_reason(self) -> Optional[Literal["eos", "stop", "length"]]: ...
    @property
    def logprobs(self) -> list[float]:
        """Each new token's log-probability under the model, before any sampling processor."""
    @property
    def top_logprobs(self) -> list[list[tuple[int, float]]]:
        """Per new token, the ``top_logprobs`` most likely (token id, log-probability) pairs."""
    @property
    def prompt_tokens(self) -> int: ...
    @property
    def cached_tokens(self) -> int:
        """Prompt tokens not computed again: held by a session's cache, or (with
        ``prefix_caching``) found among the blocks of earlier requests."""
    @property
    def time_to_first_token(self) -> float:
        """Seconds from the start of the call to the first new token."""
    @property
    def decode_tokens_per_s(self) -> float:
        """New tokens after the first, per second."""
    @property
    def constraint_time(self) -> float:
        """Seconds spent on ``json_schema``, ``regex`` or ``grammar``: computing each token's
        mask and moving the grammar's matcher past the token (0 without one)."""
    @property
    def content(self) -> Optional[str]:
        """For ``chat`` with ``tools``: the text outside the tool calls; otherwise None."""
    @property
    def tool_calls(self) -> Optional[list[dict[str, Any]]]:
        """For ``chat`` with ``tools``: ``[{"name": str, "arguments": dict}]``; otherwise None."""

@disjoint_base
class _Generates:
    """The generating methods that ``Generator`` and ``Session`` share."""

    @overload
    def generate(self, prompt: str, *, details: Literal[False] = False, **kwargs: Unpack[GenerateOptions]) -> str: ...
    @overload
    def generate(self, prompt: str, *, details: Literal[True], **kwargs: Unpack[GenerateOptions]) -> GenerationResult: ...
    @overload
    def generate_ids(self, ids: Sequence[int], *, details: Literal[False] = False, **kwargs: Unpack[GenerateOptions]) -> list[int]:
        """The new token ids after ``ids`` (an end-of-sequence token that ended it included);
        with ``details=True`` a ``GenerationResult``. Ids outside [0, vocab_size) raise ValueError."""
    @overload
    def generate_ids(self, ids: Sequence[int], *, details: Literal[True], **kwargs: Unpack[GenerateOptions]) -> GenerationResult: ...
    def stream(self, prompt: str, **kwargs: Unpack[GenerateOptions]) -> TextStream:
        """Like ``generate``, as an iterator of text chunks. Argument errors raise here, at once."""
    @overload
    def chat(
        self,
        messages: Sequence[_Message],
        *,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
        documents: Optional[Sequence[Mapping[str, Any]]] = None,
        tool_choice: Union[Literal["auto", "none", "required"], Mapping[str, Any], None] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        details: Literal[False] = False,
        **kwargs: Any,
    ) -> str:
        """Generates the assistant's answer to ``messages``, rendered by the model's chat template.

        ``messages`` are dicts (pydantic models and dataclasses are read as dicts), each passed to
        the template as it is: ``role`` and ``content`` (a string, or a list of parts), and any other
        field a template reads (``tool_calls`` on an assistant turn, ``tool`` role turns, a
        ``reasoning_content``). As transformers does, fields set to None are dropped.

        The keywords of ``GenerateOptions`` (and ``details``) steer the generation. Every other
        keyword is a template variable, as transformers' ``apply_chat_template`` passes them:
        ``tools`` (function specs as JSON-schema dicts, as transformers and OpenAI write them),
        ``documents`` (dicts), and e.g. ``thinking=True`` or ``controls={...}`` for Granite 3.x
        templates. A keyword one typo from a generation keyword raises TypeError ("did you mean");
        a template variable of such a name goes in ``chat_template_kwargs``.

        With ``tools``, the model's tool calls are read back: ``details=True`` results carry
        ``tool_calls`` (``[{"name": str, "arguments": dict}]``) and ``content`` (the text outside
        them), and a stream's ``tool_calls`` lists those complete so far. The format is the one
        the template asks for: Granite 3.x's ``<|tool_call|>[{...}]`` when the template names
        ``<|tool_call|>``, else ``<tool_call>{...}</tool_call>`` (Granite 4.0, Hermes).
        ``tool_choice`` is OpenAI's: "auto" (default) and "none" leave the text free; "required",
        or a function (``{"type": "function", "function": {"name": ...}}`` or ``{"name": ...}``),
        constrains the answer to exactly one call, of that function or any, whose arguments are
        valid under its ``parameters`` schema (not combinable with ``json_schema``, ``regex`` or
        ``grammar``).

        Raises:
            TypeError: a value that is not JSON (the message names where it is).
            ValueError: a template that fails (its message), runs past 50 million instructions
                or writes more than 64 MiB; tools or documents that are not lists of dicts.
        """
    @overload
    def chat(
        self,
        messages: Sequence[_Message],
        *,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
        documents: Optional[Sequence[Mapping[str, Any]]] = None,
        tool_choice: Union[Literal["auto", "none", "required"], Mapping[str, Any], None] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        details: Literal[True],
        **kwargs: Any,
    ) -> GenerationResult: ...
    def stream_chat(
        self,
        messages: Sequence[_Message],
        *,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
        documents: Optional[Sequence[Mapping[str, Any]]] = None,
        tool_choice: Union[Literal["auto", "none", "required"], Mapping[str, Any], None] = None,
        chat_template_kwargs: Optional[Mapping[str, Any]] = None,
        **kwargs: Any,
    ) -> TextStream:
        """``chat`` as an iterator of text chunks."""

@disjoint_base
class Generator(_Generates):
    """A Granite (or Llama) model loaded from a ``.gguf`` file or an HF model directory.

    A GGUF file (architectures ``llama`` and ``granite``) keeps its weight matrices as stored
    (F16 and BF16 are computed as their float32 values; Q4_0, Q4_1 and Q8_0 at their exact values
    against activations rounded to 16 bits per 32 values; the k-quants through candle's quantized
    matmul, which quantizes the activations to 8 bits as llama.cpp does); its
    tokenizer and chat template are built from its metadata as transformers builds them. A
    directory holds ``config.json``, ``tokenizer.json``, ``model.safetensors`` (or shards with
    ``model.safetensors.index.json``), and optionally ``generation_config.json`` (its values become
    the defaults of the generation keywords, as in transformers) and a chat template
    (``chat_template.jinja``, or ``chat_template`` in ``tokenizer_config.json``).

    ``quantize`` converts the weight matrices at load: ``"f16"`` or ``"bf16"`` (half the memory
    and bandwidth of float32, computed in float32), ``"q8_0"``, ``"q4_0"``, ``"q4_1"``,
    ``"q4_k"``, ``"q5_k"``, ``"q6_k"`` (rows that a k-quant's 256-value blocks do not divide
    become Q8_0), or ``"none"`` to dequantize a GGUF to the compute dtype. Quantized weights run
    on the CPU. ``num_threads`` sets the CPU threads (default: one per physical core); it is
    process-wide and fixed by the first model loaded (ValueError if a later one asks for another).
    ``matmul_precision`` ``"fast"`` (default): a prompt's products round the activations to
    bf16 where the CPU multiplies bf16 (AMX tiles, AVX512-BF16), as transformers and llama.cpp
    compute bf16 models (each product exact, f32 sums), and non-bf16 weights too; ``"int8"``:
    for GGUF block weights (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K) where the CPU has AVX512-VNNI,
    the activations rounded to 8-bit integers per 32 as llama.cpp computes them, in prompts and
    decode (faster, above all for batches, and coarser: greedy tokens may differ), the others as
    ``"fast"``; ``"exact"``: float32 activations in every prompt product, decode as ``"fast"``.

    ``kv_cache_bytes`` is the memory of every sequence's KV cache together (generations, streams,
    sessions, batch rows), set aside at load in blocks of 16 positions; a sequence takes blocks as
    it grows and gives them back when it ends or is truncated. Default: one sequence of the whole
    context, within 1 and 16 GiB (on the CPU its pages are used only once written).
    ``model_info`` reports it. A generation starts once the free blocks hold its prompt and
    ``max_new_tokens`` beside what the running ones may still take; until then it waits.

    ``prefix_caching`` is automatic prefix caching: every full block of 16 positions is indexed by
    its tokens and all those before it, and a generation whose prompt starts with tokens computed
    before (a system prompt, a shared few-shot prefix) takes those blocks instead of computing
    them; ``GenerationResult.cached_tokens`` counts them. Blocks no sequence holds stay cached
    until their room is wanted, the least recently used first. ``None`` (default): on where it is
    exact, so that a generation's tokens and log-probabilities are, to the bit, those of its
    prompt computed whole: only blocks computed as a prompt's rows are reused and the rest of
    the prompt is computed as in the whole, which holds for attention-only models without experts
    whose prompt products run on the CPU's bf16 kernels (AVX512-BF16 or AMX, ``matmul_precision``
    other than ``"exact"``) or int8 ones (``"int8"``, AVX512-VNNI); elsewhere off.
    ``model_info["prefix_caching"]`` says ``"exact"`` or ``"off"``. ``True`` (``"all"``): every
    block, earlier answers and models with experts included; reused keys and values were then
    computed in another forward, so logits agree with an uncached run to float rounding (greedy
    tokens can differ where two are nearly tied). ``False``: off. Models with Mamba2 layers keep
    a recurrent state, not per-position keys, and never reuse prefixes.

    A Generator is immutable and thread-safe; every call gets its own KV cache, and all model work
    runs with the GIL released.

    ``generate(prompt, **kw)`` returns the new text (the prompt is not repeated), greedy unless
    ``do_sample``; with ``details=True`` a ``GenerationResult``. Generation ends at an
    end-of-sequence token (unless ``ignore_eos``), a ``stop`` string, a ``stop_token_ids`` token,
    ``max_new_tokens`` or the context length. ``chat(messages, **kw)`` renders the chat template
    with the generation prompt (as transformers' ``apply_chat_template``) and generates from it.
    Ctrl-C stops a running call within about 50 ms and one layer's forward.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: a bad ``device``, ``dtype`` or keyword value; an empty prompt; a prompt that
            does not fit the context (the message gives both lengths); a bad message.
        TypeError: an unknown keyword, or a value of the wrong type (the message names it).
        GraniteError: a config we cannot honour (the message names the field), a corrupt or
            mis-shaped weight (named, with both shapes), a tokenizer that does not parse, a chat
            template that fails (or is missing, for ``chat``).
    """

    def __new__(
        cls,
        model_dir: Union[str, PathLike[str]],
        *,
        device: str = "cpu",
        dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
        quantize: Optional[Literal["none", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q4_k", "q5_k", "q6_k"]] = None,
        num_threads: Optional[int] = None,
        matmul_precision: Optional[Literal["fast", "int8", "exact"]] = None,
        kv_cache_bytes: Optional[int] = None,
        prefix_caching: Optional[bool] = None,
    ) -> Self: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids. Raises ValueError for an id outside [0, vocab_size)."""
    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits of shape (len(ids), vocab_size) from one uncached forward over ``ids``."""
    def apply_chat_template(
        self,
        messages: Sequence[_Message],
        add_generation_prompt: bool = True,
        *,
        tools: Optional[Sequence[Mapping[str, Any]]] = None,
        documents: Optional[Sequence[Mapping[str, Any]]] = None,
        **kwargs: Any,
    ) -> str:
        """The chat template's text for ``messages``, as transformers' ``apply_chat_template``
        (``tokenize=False``) renders it, in a sandbox. ``tools``, ``documents`` and every other
        keyword are template variables (see ``chat``)."""
    def generate_batch(self, prompts: Sequence[str], **kwargs: Unpack[GenerateOptions]) -> list[str]:
        """Generates for all prompts together: one forward per step over every unfinished prompt
        (no padding; a prompt that finishes leaves the batch at once).

        Each row's text equals ``generate(p, **its_kwargs)`` exactly, greedy or sampled, whatever
        the other rows (on the CPU). A keyword may give one value per prompt as a list, e.g.
        ``seed=[1, 2, 3]`` or ``max_new_tokens=[16, 64, 8]``; a list-valued keyword (``stop``,
        ``stop_token_ids``, ...) does so as a list of lists. ``details`` is not supported here.
        """
    def session(self) -> Session:
        """A new conversation that keeps its KV cache between calls."""
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int:
        """The most tokens (prompt and new) one sequence may hold: ``max_position_embeddings``,
        or with dynamic RoPE scaling, which rescales to any length, what the KV cache budget holds."""
    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from config.json and generation_config.json."""
    @property
    def device(self) -> str: ...
    @property
    def weight_bytes(self) -> int:
        """Bytes of the weight matrices: what one decode step reads."""
    @property
    def mapped_weight_bytes(self) -> int:
        """Bytes of the weight matrices read in place from the memory-mapped checkpoint file (CPU):
        those whose stored type is used as stored. They are not copied into the process's memory;
        the OS pages them in, shares them between processes and may evict them."""
    @property
    def weight_types(self) -> dict[str, int]:
        """How many weight matrices have each type (``f32``, ``bf16``, ``q4_1``, ...)."""
    @property
    def num_threads(self) -> int:
        """CPU threads used for compute, process-wide."""
    @property
    def dtype(self) -> str: ...
    @property
    def model_info(self) -> dict[str, object]:
        """What the model's files say, the keys that are known of: ``format`` ("HF model directory"
        or "GGUF file"), ``architecture``, ``model_type``, ``name``, ``num_hidden_layers``,
        ``hidden_size``, ``intermediate_size``, ``num_attention_heads``, ``num_key_value_heads``,
        ``torch_dtype`` (the stored dtype, or a GGUF's file type such as "Q4_1"), ``parameters``,
        ``active_parameters`` (those one token uses: all but the experts its router does not
        select), ``attention_layers`` and ``mamba_layers`` (the mixers), with experts
        ``num_local_experts`` and ``num_experts_per_tok``, beside them ``shared_intermediate_size``,
        and ``trained_context_length``; and the KV cache pool: ``kv_cache_bytes``,
        ``kv_cache_positions`` (all sequences together), ``kv_cache_free_positions`` (now, cached
        prefixes that no sequence holds included), ``kv_block_positions``, ``prefix_caching`` and
        ``kv_cache_idle_cached_positions`` (those cached prefixes; ``prefix_caching`` is "exact",
        "all" or "off"); with Mamba2 layers,
        ``ssm_state_bytes`` (one sequence's state, outside ``kv_cache_bytes``) and ``ssm_checkpoints`` (the copies of it
        each sequence keeps at most, besides the state itself)."""
    @property
    def scheduler_stats(self) -> dict[str, int]:
        """The scheduler every generation of this model runs on (continuous batching): ``running``
        (requests in the batch now), ``waiting`` (for room in the KV cache), ``steps`` (forwards so
        far, each over every running request), ``tokens`` (what those forwards computed) and
        ``prefill_chunk`` (prompt tokens a request feeds per step)."""

@final
class Session(_Generates):
    """A conversation that keeps its KV cache, as passing ``past_key_values`` back to
    transformers' ``generate`` does, without the bookkeeping.

    Each call reuses the longest common token prefix of its prompt with what is cached (prompts
    and generated tokens of earlier calls) and computes only the rest, so a follow-up chat turn
    costs only its new tokens. A model with Mamba2 layers keeps a state instead of every position:
    it reuses the longest such prefix it holds a checkpoint of (the end of each prompt, and one
    token before it) or all of what is cached. One call at a time: a second call while a generation (or an
    unfinished stream) holds the cache raises ValueError; ``fork()`` gives an independent copy.
    """

    @property
    def cached_ids(self) -> list[int]:
        """The token ids in the cache (``GenerationResult.cached_tokens`` is a count)."""
    def reset(self) -> None:
        """Forgets everything cached."""
    def truncate(self, n: int) -> None:
        """Keeps only the first ``n`` cached tokens. A model with Mamba2 layers goes back only to 0,
        to all of them, or to a checkpoint (the end of each prompt and one token before it);
        another ``n`` raises ``ValueError`` naming those."""
    def fork(self) -> Session:
        """An independent copy (the cache is copied; nothing mutable is shared)."""
