"""Type stubs and user documentation for the native module."""

from collections.abc import Iterator, Sequence
from os import PathLike
from typing import Literal, Optional, Union, final, type_check_only

import numpy as np
import numpy.typing as npt
from typing_extensions import TypedDict, Unpack

__all__ = ["Generator", "GraniteError", "TextStream", "__version__"]
__version__: str

class GraniteError(Exception):
    """A model that cannot be loaded or run: bad config, weights or tokenizer, numerical failure.

    Missing files raise ``FileNotFoundError`` and bad arguments ``ValueError`` instead.
    """

@type_check_only
class GenerateOptions(TypedDict, total=False):
    """Keywords of ``generate``, ``generate_ids`` and ``stream``; transformers' names and meaning.

    A keyword left out takes its value from the model's generation_config.json, else the default
    below. Processors run in transformers' order: repetition_penalty, then, when sampling,
    temperature, top_k, top_p.
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
    repetition_penalty: Optional[float]
    """> 0; above 1 makes tokens already in the sequence less likely (greedy too); None: off."""
    seed: Optional[int]
    """In [0, 2**64): makes sampling reproducible, whatever other calls or threads do."""
    stop: Union[str, Sequence[str], None]
    """Stop strings, matched on the text even across tokens, never included in the result."""
    stop_token_ids: Optional[Sequence[int]]
    """Token ids that end the generation (finish reason "stop")."""
    ignore_eos: bool
    """Keep going past end-of-sequence tokens (default False)."""

@final
class TextStream(Iterator[str]):
    """Text chunks of one generation, each yielded as soon as it is certain.

    ``"".join(stream)`` equals what ``Generator.generate`` returns for the same arguments.
    Dropping the iterator (``break``) stops the work.
    """

    def __iter__(self) -> TextStream: ...
    def __next__(self) -> str: ...
    @property
    def token_ids(self) -> list[int]:
        """The new token ids generated so far."""
    @property
    def finish_reason(self) -> Optional[Literal["eos", "stop", "length"]]:
        """Why the generation ended, or None while it runs."""

@final
class Generator:
    """A Granite (or Llama) model loaded from an HF model directory.

    The directory holds ``config.json``, ``tokenizer.json``, ``model.safetensors`` (or shards with
    ``model.safetensors.index.json``) and optionally ``generation_config.json``, whose values become
    the defaults of the generation keywords, as in transformers.

    A Generator is immutable and thread-safe; every call gets its own KV cache, and all model work
    runs with the GIL released.

    Args:
        model_dir: the model directory.
        device: ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` (CUDA needs a build with the ``cuda`` feature).
        dtype: compute dtype, ``"float32"``, ``"bfloat16"`` or ``"float16"``; None means float32.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: a bad ``device`` or ``dtype``.
        GraniteError: a config we cannot honour (the message names the field), a corrupt or
            mis-shaped weight (named, with both shapes), a tokenizer that does not parse.
    """

    def __new__(
        cls,
        model_dir: Union[str, PathLike[str]],
        *,
        device: str = "cpu",
        dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None,
    ) -> Generator: ...
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``."""
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids. Raises ValueError for an id outside [0, vocab_size)."""
    def logits(self, ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """Logits of shape (len(ids), vocab_size) from one uncached forward over ``ids``."""
    def generate(self, prompt: str, **kwargs: Unpack[GenerateOptions]) -> str:
        """The new text that follows ``prompt`` (the prompt is not repeated).

        Greedy unless ``do_sample``; ``GenerateOptions`` documents the keywords. Generation ends
        at an end-of-sequence token (unless ``ignore_eos``), a ``stop`` string (matched on the
        text, never included in it), a ``stop_token_ids`` token, ``max_new_tokens`` or the
        context length.

        Raises:
            ValueError: a bad keyword value, an empty prompt, or a prompt that does not fit the
                context (the message gives both lengths).
            TypeError: an unknown keyword, or a value of the wrong type (the message names it).
            KeyboardInterrupt: Ctrl-C, checked after every step.
        """
    def generate_ids(self, ids: Sequence[int], **kwargs: Unpack[GenerateOptions]) -> list[int]:
        """The new token ids after ``ids`` (an end-of-sequence token that ended it included).

        Same keywords as ``generate``; ids outside [0, vocab_size) raise ValueError.
        """
    def stream(self, prompt: str, **kwargs: Unpack[GenerateOptions]) -> TextStream:
        """Like ``generate``, as an iterator of text chunks. Argument errors raise here, at once."""
    @property
    def vocab_size(self) -> int: ...
    @property
    def context_length(self) -> int:
        """The most tokens (prompt and new) one sequence may hold."""
    @property
    def eos_token_ids(self) -> list[int]:
        """End-of-sequence ids from config.json and generation_config.json."""
    @property
    def device(self) -> str: ...
    @property
    def dtype(self) -> str: ...
