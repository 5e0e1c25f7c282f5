"""granite-rs: fast inference for IBM Granite decoder LLMs, on candle.

>>> from granite_rs import Generator
>>> g = Generator("path/to/model_dir")
>>> for chunk in g.stream("Hello", max_new_tokens=32):
...     print(chunk, end="", flush=True)
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any, Mapping

from granite_rs import _granite_rs
from granite_rs._granite_rs import GenerationResult, GraniteError, Session, TextStream, __version__

__all__ = ["Generator", "GenerationResult", "GraniteError", "Session", "TextStream", "aiterate", "__version__"]


async def aiterate(stream: TextStream) -> AsyncIterator[str]:
    """Iterates a TextStream from asyncio without blocking the event loop.

    Each chunk is computed on the loop's default executor. Cancelling the task, or leaving the
    ``async for`` early, cancels the stream: the work stops within one layer's forward.
    """
    loop = asyncio.get_running_loop()
    try:
        while True:
            chunk = await loop.run_in_executor(None, next, stream, None)
            if chunk is None:
                return
            yield chunk
    finally:
        stream.cancel()


class Generator(_granite_rs.Generator):
    __doc__ = _granite_rs.Generator.__doc__

    def astream(self, prompt: str, **kwargs: Any) -> AsyncIterator[str]:
        """``stream`` as an async iterator (see ``aiterate``)."""
        return aiterate(self.stream(prompt, **kwargs))

    def achat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> AsyncIterator[str]:
        """``stream_chat`` as an async iterator (see ``aiterate``)."""
        return aiterate(self.stream_chat(messages, **kwargs))
