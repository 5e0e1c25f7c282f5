"""Writing a stream of text chunks as they come (Ctrl-C stops it), and its statistics."""

from __future__ import annotations

import sys
import time
from typing import Any, List, Optional


class StreamOutcome:
    def __init__(self) -> None:
        self.text = ""
        self.interrupted = False
        self.first_token_s: Optional[float] = None
        self.elapsed_s = 0.0
        self.tokens = 0
        self.finish_reason: Optional[str] = None


def stream_to(stream: Any, out: Any) -> StreamOutcome:
    """Writes a TextStream's chunks to ``out`` as they come.

    Ctrl-C (KeyboardInterrupt) cancels the stream and ends the answer with what was written so
    far: the outcome has ``interrupted`` set and ``text`` holding the partial answer.
    """
    outcome = StreamOutcome()
    parts: List[str] = []
    start = time.perf_counter()
    try:
        for chunk in stream:
            if outcome.first_token_s is None:
                outcome.first_token_s = time.perf_counter() - start
            parts.append(chunk)
            out.write(chunk)
            out.flush()
    except KeyboardInterrupt:
        outcome.interrupted = True
        stream.cancel()
        try:  # the iterator ends after cancel(); finishing it releases a session's cache
            for chunk in stream:
                parts.append(chunk)
                out.write(chunk)
            out.flush()
        except KeyboardInterrupt:
            pass
    outcome.elapsed_s = time.perf_counter() - start
    outcome.text = "".join(parts)
    try:
        outcome.tokens = len(stream.token_ids)
        outcome.finish_reason = stream.finish_reason
    except Exception:  # a stream without these properties: stats only
        pass
    return outcome


def print_stats(outcome: StreamOutcome) -> None:
    ttft = f"{outcome.first_token_s * 1e3:.1f} ms" if outcome.first_token_s is not None else "-"
    decode = ""
    if outcome.first_token_s is not None and outcome.tokens > 1 and outcome.elapsed_s > outcome.first_token_s:
        decode = f", {(outcome.tokens - 1) / (outcome.elapsed_s - outcome.first_token_s):.1f} tokens/s"
    reason = "interrupted" if outcome.interrupted else (outcome.finish_reason or "-")
    print(f"[{outcome.tokens} tokens in {outcome.elapsed_s:.2f}s, first token {ttft}{decode}, finish: {reason}]",
          file=sys.stderr, flush=True)
