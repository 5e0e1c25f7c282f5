"""An OpenAI-compatible HTTP server over one ``Generator`` (``granite-rs serve``), on starlette and
uvicorn (the optional extra ``granite-rs[serve]``).

Routes: ``GET /health``, ``GET /v1/models``, ``POST /v1/chat/completions`` and
``POST /v1/completions``, streaming with server-sent events. Errors have OpenAI's JSON shape and
status codes. Request bodies are bounded, an API key (``Authorization: Bearer``) is required when
one is set, and a client that disconnects cancels its generation. Each request runs on its own
KV cache; the model's scheduler batches concurrent requests into one forward per step.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, AsyncIterator, Dict, List, Optional

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from granite_rs import Generator, GraniteError, aiterate

# The most bytes of a request body.
MAX_BODY_BYTES = 4 << 20


class ApiError(Exception):
    """An error as OpenAI returns it: a status and ``{"error": {message, type, param, code}}``."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


def _number(body: Dict[str, Any], name: str, kind: type) -> Any:
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else kind)):
        raise ApiError(400, f"{name} must be a {kind.__name__}", param=name)
    return value


def generation_kwargs(body: Dict[str, Any], chat: bool) -> Dict[str, Any]:
    """OpenAI's sampling fields as our keywords. Left out, a value comes from the model's
    generation_config.json; temperature 0 is greedy, any other temperature or top_p samples."""
    kw: Dict[str, Any] = {}
    max_tokens = _number(body, "max_completion_tokens", int) or _number(body, "max_tokens", int)
    if max_tokens is not None:
        kw["max_new_tokens"] = max_tokens
    temperature, top_p = _number(body, "temperature", float), _number(body, "top_p", float)
    if temperature is not None:
        kw.update(do_sample=False) if temperature == 0 else kw.update(do_sample=True, temperature=float(temperature))
    if top_p is not None and temperature != 0:
        kw.update(do_sample=True, top_p=float(top_p))
    for name in ("presence_penalty", "frequency_penalty"):
        if _number(body, name, float) is not None:
            kw[name] = float(body[name])
    if _number(body, "seed", int) is not None:
        kw["seed"] = body["seed"]
    if body.get("stop") is not None:
        kw["stop"] = body["stop"]
    if body.get("ignore_eos") is not None:  # vLLM's extra field
        kw["ignore_eos"] = body["ignore_eos"]
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    top = logprobs_asked(body, chat)
    if top is not None:
        kw["top_logprobs"] = top
    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_object":
        kw["json_schema"] = {"type": "object"}
    elif isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ApiError(400, "response_format json_schema needs json_schema.schema", param="response_format")
        kw["json_schema"] = schema
    elif fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise ApiError(400, "response_format type must be text, json_object or json_schema", param="response_format")
    return kw


def logprobs_asked(body: Dict[str, Any], chat: bool) -> Optional[int]:
    """How many alternatives per token the request wants log-probabilities of; None: no
    log-probabilities. Chat: ``logprobs`` true and ``top_logprobs`` 0 to 20; completions:
    ``logprobs`` 0 to 5."""
    if chat:
        top = _number(body, "top_logprobs", int)
        if body.get("logprobs") not in (None, False, True):
            raise ApiError(400, "logprobs must be a boolean", param="logprobs")
        if not body.get("logprobs"):
            if top is not None:
                raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
            return None
        top, most, name = top or 0, 20, "top_logprobs"
    else:
        top, most, name = _number(body, "logprobs", int), 5, "logprobs"
        if top is None:
            return None
    if not 0 <= top <= most:
        raise ApiError(400, f"{name} must be between 0 and {most}", param=name)
    return top


class Server:
    """The routes over one model, served under the name ``model_id``."""

    def __init__(self, generator: Generator, model_id: str, api_key: Optional[str] = None) -> None:
        self.generator, self.model_id, self.api_key = generator, model_id, api_key
        self.created = int(time.time())
        # Generations running now (GET /health reports it).
        self.running = 0
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def _not_found(self, request: Request, exc: Exception) -> Response:
        return ApiError(404, f"no route {request.url.path}", code="not_found").response()

    async def _not_allowed(self, request: Request, exc: Exception) -> Response:
        return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()

    async def health(self, request: Request) -> Response:
        stats = self.generator.scheduler_stats
        return JSONResponse({"status": "ok", "running": self.running, "batch": stats["running"],
                             "waiting": stats["waiting"],
                             "kv_cache_free_positions": self.generator.model_info["kv_cache_free_positions"]})

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as e:
            return e.response()
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    def _model_card(self) -> Dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "granite-rs"}

    def _authorize(self, request: Request) -> None:
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key (Authorization: Bearer ...)", code="invalid_api_key")

    async def _body(self, request: Request) -> Dict[str, Any]:
        self._authorize(request)
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        raw = b""
        async for part in request.stream():
            raw += part
            if len(raw) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body is over {MAX_BODY_BYTES} bytes")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ApiError(400, f"the body is not JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object")
        if body.get("model") not in (None, self.model_id):
            raise ApiError(404, f"the model {body.get('model')!r} does not exist; this server has {self.model_id!r}",
                           param="model", code="model_not_found")
        return body

    async def chat_completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            messages = body.get("messages")
            if not isinstance(messages, list) or not messages:
                raise ApiError(400, "messages must be a non-empty list", param="messages")
            kw = generation_kwargs(body, chat=True)
            tools = body.get("tools")
            if tools:
                kw.update(tools=tools, tool_choice=body.get("tool_choice"))
            stream = self._open(lambda: self.generator.stream_chat(messages, **kw))
        except ApiError as e:
            return e.response()
        return await self._respond(request, body, stream, chat=True, tools=bool(tools))

    async def completions(self, request: Request) -> Response:
        try:
            body = await self._body(request)
            prompt = body.get("prompt")
            if not isinstance(prompt, str):
                raise ApiError(400, "prompt must be a string", param="prompt")
            kw = generation_kwargs(body, chat=False)
            stream = self._open(lambda: self.generator.stream(prompt, **kw))
        except ApiError as e:
            return e.response()
        return await self._respond(request, body, stream, chat=False, tools=False)

    @staticmethod
    def _open(start: Any) -> Any:
        """Starts a stream; our argument errors become OpenAI 400s."""
        try:
            return start()
        except (ValueError, TypeError, OverflowError) as e:
            raise ApiError(400, str(e)) from None
        except GraniteError as e:
            raise ApiError(500, str(e), kind="server_error") from None

    async def _respond(self, request: Request, body: Dict[str, Any], stream: Any, chat: bool,
                       tools: bool) -> Response:
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        logprobs = logprobs_asked(body, chat) is not None
        if body.get("stream"):
            events = self._events(ident, stream, chat, tools, logprobs,
                                  bool((body.get("stream_options") or {}).get("include_usage")))
            return StreamingResponse(events, media_type="text/event-stream")
        text = ""
        self.running += 1
        try:
            async for chunk in aiterate(stream):
                text += chunk
                if await request.is_disconnected():
                    stream.cancel()
                    return Response(status_code=499)
        finally:
            self.running -= 1
        choice = self._final(stream, text, chat, tools)
        if logprobs:
            choice["logprobs"] = self._logprobs(stream, 0, chat)
        kind = "chat.completion" if chat else "text_completion"
        return JSONResponse({"id": ident, "object": kind, "created": int(time.time()), "model": self.model_id,
                             "choices": [choice], "usage": _usage(stream)})

    def _final(self, stream: Any, text: str, chat: bool, tools: bool) -> Dict[str, Any]:
        finish = "length" if stream.finish_reason == "length" else "stop"
        if not chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        message: Dict[str, Any] = {"role": "assistant", "content": text}
        calls = stream.tool_calls if tools else None
        if calls:
            message["content"] = stream.content or None
            message["tool_calls"] = _openai_calls(calls)
            finish = "tool_calls"
        return {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}

    def _logprobs(self, stream: Any, start: int, chat: bool) -> Dict[str, Any]:
        """The log-probabilities of the new tokens from ``start`` on, as OpenAI writes them."""
        ids, values, tops = stream.token_ids[start:], stream.logprobs[start:], stream.top_logprobs[start:]
        words = self._token_texts(ids + [t for top in tops for t, _ in top])
        if chat:
            def entry(token: int, value: float) -> Dict[str, Any]:
                return {"token": words[token], "logprob": value, "bytes": list(words[token].encode())}

            return {"content": [{**entry(t, v), "top_logprobs": [entry(a, w) for a, w in top]}
                                for t, v, top in zip(ids, values, tops)], "refusal": None}
        offsets, at = [], 0
        for t in ids:
            offsets.append(at)
            at += len(words[t])
        return {"tokens": [words[t] for t in ids], "token_logprobs": values,
                "top_logprobs": [{words[a]: w for a, w in top} for top in tops], "text_offset": offsets}

    def _token_texts(self, ids: List[int]) -> Dict[int, str]:
        return {t: self.generator.decode([t], skip_special_tokens=False) for t in set(ids)}

    async def _events(self, ident: str, stream: Any, chat: bool, tools: bool, logprobs: bool,
                      include_usage: bool) -> AsyncIterator[str]:
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        sent = 0  # new tokens whose log-probabilities have gone out

        def event(choice: Dict[str, Any], usage: Optional[Dict[str, Any]] = None) -> str:
            nonlocal sent
            if choice and logprobs:
                choice["logprobs"] = self._logprobs(stream, sent, chat)
                sent = len(stream.token_ids)
            data: Dict[str, Any] = {"id": ident, "object": kind, "created": created, "model": self.model_id,
                                    "choices": [choice] if choice else []}
            if usage is not None:
                data["usage"] = usage
            return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

        if chat:
            yield event({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        text = ""
        self.running += 1
        try:
            # With tools the text is held back: a tool call is reported whole, never as content.
            async for chunk in aiterate(stream):
                text += chunk
                if not tools:
                    yield event({"index": 0, "delta": {"content": chunk}, "finish_reason": None} if chat
                                else {"index": 0, "text": chunk, "logprobs": None, "finish_reason": None})
        finally:
            self.running -= 1
        choice = self._final(stream, text, chat, tools)
        if chat:
            message = choice["message"]
            if tools:
                delta: Dict[str, Any] = {"content": message["content"]}
                if "tool_calls" in message:
                    delta["tool_calls"] = [{"index": i, **c} for i, c in enumerate(message["tool_calls"])]
                yield event({"index": 0, "delta": delta, "finish_reason": None})
            yield event({"index": 0, "delta": {}, "finish_reason": choice["finish_reason"]})
        else:
            yield event({"index": 0, "text": "", "logprobs": None, "finish_reason": choice["finish_reason"]})
        if include_usage:
            yield event({}, _usage(stream))
        yield "data: [DONE]\n\n"


def _usage(stream: Any) -> Dict[str, Any]:
    """Token counts of a finished stream; ``prompt_tokens_details.cached_tokens`` are those not
    computed again (``--prefix-caching``)."""
    prompt, completion = stream.prompt_tokens, len(stream.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": stream.cached_tokens}}


def _openai_calls(calls: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """Our tool calls as OpenAI writes them: arguments as a JSON string, each with an id."""
    return [{"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]
