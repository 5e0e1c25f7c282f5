"""granite-rs: fast inference for IBM Granite decoder LLMs, on candle.

>>> from granite_rs import Generator
>>> g = Generator("path/to/model_dir")
>>> for chunk in g.stream("Hello", max_new_tokens=32):
...     print(chunk, end="", flush=True)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from os import PathLike
from typing import Any, Mapping, Optional, Union

from granite_rs import _granite_rs
from granite_rs._granite_rs import GenerationResult, GraniteError, Session, TextStream, __version__
from granite_rs.hub import local_path

__all__ = ["Generator", "GenerationResult", "GraniteError", "Session", "TextStream", "aiterate", "__version__"]


async def aiterate(stream: TextStream) -> AsyncIterator[str]:
    """Iterates a TextStream from asyncio without blocking the event loop.

    A thread of the stream's own waits for each chunk and hands it to the loop. Cancelling the
    task, or leaving the ``async for`` early, cancels the stream: the work stops within one
    layer's forward.
    """
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue[Union[str, Exception, None]] = asyncio.Queue()

    def hand(item: Union[str, Exception, None]) -> None:
        try:
            loop.call_soon_threadsafe(arrived.put_nowait, item)
        except RuntimeError:  # the loop has closed: nobody is listening
            stream.cancel()

    def pump() -> None:
        try:
            for chunk in stream:
                hand(chunk)
        except Exception as e:  # raised where the chunks are awaited
            hand(e)
        else:
            hand(None)

    threading.Thread(target=pump, name="granite-rs aiterate", daemon=True).start()
    try:
        while True:
            item = await arrived.get()
            if isinstance(item, Exception):
                raise item
            if item is None:
                return
            yield item
    finally:
        stream.cancel()


class Generator(_granite_rs.Generator):
    __doc__ = _granite_rs.Generator.__doc__

    def __new__(cls, model: Union[str, PathLike[str]], *, filename: Optional[str] = None,
                revision: Optional[str] = None, **kwargs: Any) -> Generator:
        """Loads ``model``: a local HF model directory or ``.gguf`` file, or an HF Hub id
        (``"ibm-granite/granite-3.3-2b-instruct"``; with ``filename="*Q4_K_M.gguf"`` the one file
        of a GGUF repository it matches; ``revision`` a branch, tag or commit), found in the local
        HF cache or downloaded into it (see ``granite_rs.hub``). ``kwargs`` are the native
        ``Generator``'s: ``device``, ``dtype``, ``quantize``, ..."""
        return super().__new__(cls, local_path(model, filename, revision), **kwargs)

    def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        """``stream`` as an async iterator (see ``aiterate``)."""
        return aiterate(self.stream(prompt, **kwargs))

    def achat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> AsyncIterator[str]:
        """``stream_chat`` as an async iterator (see ``aiterate``)."""
        return aiterate(self.stream_chat(messages, **kwargs))
