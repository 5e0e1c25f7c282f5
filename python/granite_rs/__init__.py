"""granite-rs: fast inference for IBM Granite decoder LLMs, on candle.

>>> from granite_rs import Generator
>>> g = Generator("path/to/model_dir")
>>> for chunk in g.stream("Hello", max_new_tokens=32):
...     print(chunk, end="", flush=True)
"""

from granite_rs._granite_rs import Generator, GraniteError, TextStream, __version__

__all__ = ["Generator", "GraniteError", "TextStream", "__version__"]
