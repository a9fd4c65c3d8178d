"""HTTP front end (FastAPI): OpenAI-compatible completions / chat / models, admin ``/v1/deltas``,
``/metrics`` and ``/health``.

Compatibility notes (what an OpenAI client sees):

- ``model`` selects the expert: a registered task, the base model's name, or
  ``auto`` (automatic routing). The response's ``model`` is the expert that served
  it; the routing decision is in an extra top-level ``routing`` object (and the
  ``x-deltaserve-expert`` header).
- Images: chat content parts ``{"type": "image_url", "image_url": {"url": "data:image/png;base64,…"}}``.
  Only ``data:`` URLs — the server never fetches remote URLs. ``/v1/completions``
  accepts an extension field ``image`` (a data URL or plain base64).
- Sampling: everything vLLM's server takes that applies to this model — ``n``, ``stop``,
  ``seed``, ``top_p``/``top_k``/``min_p``, presence/frequency/repetition penalties,
  ``logprobs``/``top_logprobs``, ``max_completion_tokens``, ``response_format`` (``json_object``,
  ``json_schema``: structured output), ``stream_options.include_usage``, and vLLM's extensions
  ``ignore_eos``, ``min_tokens``, ``return_token_ids``, ``request_id``. ``echo``, ``suffix``,
  ``best_of``, ``logit_bias`` and tools are refused with 400 rather than silently ignored.
- ``top_logprobs`` (chat) / ``logprobs`` (completions) list the most likely tokens at each
  position, as OpenAI defines them; vLLM's server lists the sampled token first, which differs
  only when the sampled token is not the most likely (never under greedy decoding).
- Streaming: the first event carries ``routing``; usage only with ``stream_options.include_usage``
  (a last event with empty ``choices``, as OpenAI sends it).
- Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``; a
  malformed body is 400 (not FastAPI's 422).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from pydantic import BaseModel, ConfigDict, Field

from deltaserve.plugins.errors import DeltaServeError
from deltaserve.server.errors import InvalidRequestError, client_message, status_of
from deltaserve.server.registry import LiveDelta
from deltaserve.server.requests import InferenceRequest, SamplingFields
from deltaserve.server.engine import Chunk, TokenLogprob
from deltaserve.server.service import AUTO, DeltaService, Routed
from deltaserve.server.upload_body import body_limit, parse_upload

# ---- request bodies -----------------------------------------------------------------


log = logging.getLogger(__name__)


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = AUTO
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    user: str | None = None
    return_token_ids: bool = False
    """Extension (as in vLLM's server): add the generated token ids to the choice."""
    ignore_eos: bool = False
    """Extension (as in vLLM's server): generate ``max_tokens`` even past end-of-sequence."""
    min_tokens: int | None = None
    """Extension (as in vLLM's server): generate at least this many tokens."""
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    """Extension (as in vLLM's server)."""
    response_format: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None
    """``{"include_usage": true}``: a last chunk with empty ``choices`` carries the usage."""
    request_id: str | None = None
    """Extension (as in vLLM's server): the request's id (also accepted as the ``X-Request-Id``
    header); echoed in the response ``id`` and the ``x-request-id`` header."""

    def sampling(self) -> SamplingFields:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingFields(
            max_tokens=self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            seed=self.seed,
            stop=stop,
            ignore_eos=self.ignore_eos,
            n=self.n,
            min_p=self.min_p,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            repetition_penalty=self.repetition_penalty,
            min_tokens=self.min_tokens,
            logprobs=self.logprob_count(),
            response_format=self.response_format,
        )

    def logprob_count(self) -> int | None:
        return None

    def include_usage(self) -> bool:
        options = self.stream_options or {}
        unknown = sorted(set(options) - {"include_usage"})
        if unknown:
            raise InvalidRequestError(f"`stream_options` has unsupported fields: {unknown}")
        value = options.get("include_usage", False)
        if not isinstance(value, bool):
            raise InvalidRequestError("`stream_options.include_usage` must be true or false")
        return value

    def check_unsupported(self, *fields: str) -> None:
        extra = self.model_extra or {}
        for name in fields:
            if extra.get(name) not in (None, False, 0, 1, [], ""):
                raise InvalidRequestError(f"`{name}` is not supported by deltaserve")


class CompletionBody(_Body):
    prompt: str | list[str]
    image: str | None = None
    """Extension: one image as a data URL or plain base64."""
    logprobs: int | None = None
    """Alternatives per token to return with log-probabilities (0: the sampled token's only)."""

    def logprob_count(self) -> int | None:
        return self.logprobs


class ChatBody(_Body):
    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool = False
    top_logprobs: int | None = None

    def logprob_count(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("`top_logprobs` needs `logprobs: true`")
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- helpers ------------------------------------------------------------------------


def _decode_image_url(url: str, field: str) -> bytes:
    if url.startswith("data:"):
        header, _, data = url.partition(",")
        if ";base64" not in header:
            raise InvalidRequestError(f"`{field}` must be a base64 data URL")
    elif url.startswith(("http://", "https://")):
        raise InvalidRequestError(
            f"`{field}`: remote image URLs are not fetched; send a data URL (data:image/png;base64,…)"
        )
    else:
        data = url
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError(f"`{field}` is not valid base64") from None


def _chat_messages(messages: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], bytes | None]:
    """OpenAI messages → template messages (image parts as ``{"type": "image"}``) + the image bytes."""
    image: bytes | None = None
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise InvalidRequestError(f"`messages[{i}]` must be an object")
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text":
                    text = part.get("text", "")
                    if not isinstance(text, str):
                        raise InvalidRequestError(f"`messages[{i}].content[{j}].text` must be a string")
                    parts.append({"type": "text", "text": text})
                elif kind == "image_url":
                    if image is not None:
                        raise InvalidRequestError("at most one image per request")
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise InvalidRequestError(f"`messages[{i}].content[{j}].image_url.url` must be a string")
                    image = _decode_image_url(url, f"messages[{i}].content[{j}].image_url.url")
                    parts.append({"type": "image"})
                else:
                    raise InvalidRequestError(f"`messages[{i}].content[{j}].type` must be `text` or `image_url`")
            content = parts
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise InvalidRequestError(f"`messages[{i}].content` must be a string or a list of parts")
        out.append({"role": message.get("role"), "content": content})
    return out, image


def _routing_json(routed: Routed) -> dict:
    d = routed.decision
    out = {"expert": routed.expert, "router": d.router, "score": d.score, "reason": d.reason, "scores": d.scores}
    if routed.replica is not None:  # engine replicas: which one served it, and whether it held the delta already
        out["replica"] = routed.replica
    return out


def _usage(routed: Routed, completion: int) -> dict:
    return {
        "prompt_tokens": routed.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": routed.prompt_tokens + completion,
    }


def _request_id(body: _Body, request: Request) -> str | None:
    return body.request_id or request.headers.get("x-request-id") or None


async def _while_connected(request: Request, events: AsyncIterator, *, stream: bool) -> AsyncIterator:
    """``events`` while the HTTP client is still there; once it has gone, stop — which aborts the
    engine request within a token or two.

    A watcher task waits for the server's ``http.disconnect`` message (the body has been read: the
    next message can only be that one). Starlette itself notices a vanished client only when a
    write fails, which the kernel's socket buffer delays by hundreds of tokens; asking
    ``request.is_disconnected()`` per chunk instead took a quarter of the event loop's time under
    load (an anyio cancel scope per call, measured with py-spy). A stream checks the watcher's
    flag per chunk; a non-streaming request (one final chunk per choice) waits for its output or
    the watcher, whichever comes first, and cancels the generation when the client has gone.
    """
    gone = asyncio.Event()

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    watcher = asyncio.create_task(watch())
    try:
        if stream:
            async for event in events:
                if gone.is_set():
                    return
                yield event
            return
        while True:
            step = asyncio.ensure_future(anext(events, None))
            await asyncio.wait((step, watcher), return_when=asyncio.FIRST_COMPLETED)
            if not step.done():  # the client left first
                step.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await step
                return
            event = step.result()
            if event is None:
                return
            yield event
    finally:
        watcher.cancel()
        await events.aclose()


LOGPROB_FLOOR = -9999.0
"""JSON has no -inf: a log-probability below this is sent as this (as vLLM's server does)."""


def _choice_json(
    index: int,
    text: str,
    logprobs: list[TokenLogprob] | None,
    finish: str | None,
    *,
    chat: bool,
    stream: bool,
    offset: int,
) -> dict:
    """One entry of ``choices``: a chat message (or its delta when streaming) or a completion text;
    ``offset``: where ``text`` starts in the whole answer (completions' ``text_offset``)."""
    if chat:
        content = ({"content": text} if text else {}) if stream else {"message": {"role": "assistant", "content": text}}
        lp = None if logprobs is None else {"content": [_chat_logprob(e) for e in logprobs]}
        return {"index": index, **({"delta": content} if stream else content), "logprobs": lp, "finish_reason": finish}
    return {
        "index": index,
        "text": text,
        "logprobs": None if logprobs is None else _completion_logprobs(logprobs, offset),
        "finish_reason": finish,
    }


def _chat_logprob(e: TokenLogprob) -> dict:
    top = [{"token": tok, "logprob": max(lp, LOGPROB_FLOOR), "bytes": list(tok.encode())} for _, tok, lp in e.top]
    return {
        "token": e.token,
        "logprob": max(e.logprob, LOGPROB_FLOOR),
        "bytes": list(e.token.encode()),
        "top_logprobs": top,
    }


def _completion_logprobs(entries: list[TokenLogprob], offset: int) -> dict:
    out: dict[str, list] = {"text_offset": [], "token_logprobs": [], "tokens": [], "top_logprobs": []}
    for e in entries:
        out["text_offset"].append(offset)
        offset += len(e.token)
        out["tokens"].append(e.token)
        out["token_logprobs"].append(max(e.logprob, LOGPROB_FLOOR))
        out["top_logprobs"].append({tok: max(lp, LOGPROB_FLOOR) for _, tok, lp in e.top})
    return out


async def _stream(
    routed: Routed, events: AsyncIterator[Chunk], head: dict, n: int, *, chat: bool, include_usage: bool
) -> AsyncIterator[bytes]:
    """Server-sent events as OpenAI's API sends them; the first event also carries ``routing``,
    the last (with ``stream_options.include_usage``) has no choices and the usage."""
    if chat:
        head = {**head, "object": "chat.completion.chunk"}
        for index in range(n):
            first = {
                "index": index,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            yield _sse({**head, "choices": [first], **({"routing": _routing_json(routed)} if index == 0 else {})})
    offsets = [0] * n
    completion = 0
    routed_sent = chat
    async for chunk in events:
        completion += len(chunk.token_ids)
        choice = _choice_json(
            chunk.index,
            chunk.text,
            chunk.logprobs,
            chunk.finish_reason if chunk.finished else None,
            chat=chat,
            stream=True,
            offset=offsets[chunk.index],
        )
        offsets[chunk.index] += len(chunk.text)
        payload = {**head, "choices": [choice]}
        if not routed_sent:
            payload["routing"] = _routing_json(routed)
            routed_sent = True
        yield _sse(payload)
    if include_usage:
        yield _sse({**head, "choices": [], "usage": _usage(routed, completion)})
    yield _sse("[DONE]")


def error_response(exc: Exception) -> JSONResponse:
    _, http_status, err_type = status_of(exc)
    return JSONResponse(
        {"error": {"message": client_message(exc), "type": err_type, "param": None, "code": http_status}},
        status_code=http_status,
    )


def _sse(obj: dict | str) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


def delta_json(delta: LiveDelta) -> dict:
    return {
        "name": delta.name,
        "kind": delta.kind,
        "binding": delta.binding.mode,
        "serving": delta.binding.serving,
        "description": delta.manifest.task.description,
        "content_digest": delta.digest,
        "base_fingerprint": delta.manifest.base.fingerprint,
        "size_bytes": delta.size_bytes,
        "registered_at": delta.registered_at,
        "manifest": delta.manifest.to_dict(),
    }


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    return value.removeprefix("Bearer ").strip() if value.startswith("Bearer ") else None


# ---- the app ------------------------------------------------------------------------


class _LastResort:
    """Any exception no handler maps becomes a 500 in the OpenAI error shape, on a connection that stays open.

    Not ``@app.exception_handler(Exception)``: Starlette runs that handler in its outermost middleware and then
    re-raises, and uvicorn answers a re-raised exception by closing the connection. Added with
    ``add_middleware``, this sits inside that middleware and swallows the exception once it has answered. An
    exception after the response has started (mid-stream) still ends the connection: nothing else can tell the
    client that the body is incomplete.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched_send(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if started:
                raise
            log.exception("unexpected error on %s %s", scope.get("method"), scope.get("path"))
            await error_response(exc)(scope, receive, send)  # no server detail: see client_message


def create_app(service: DeltaService) -> FastAPI:
    app = FastAPI(title="deltaserve", version="1", docs_url="/docs", redoc_url=None)
    created = int(time.time())

    @app.exception_handler(DeltaServeError)
    async def _typed_error(request: Request, exc: DeltaServeError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        problems = "; ".join(f"`{'.'.join(str(p) for p in e['loc'][1:])}`: {e['msg']}" for e in exc.errors())
        return error_response(InvalidRequestError(f"invalid request body: {problems}"))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        # Starlette's own refusals (unparsable or non-UTF-8 body, unknown path, wrong method) in the OpenAI error shape.
        err_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        body = {"error": {"message": str(exc.detail), "type": err_type, "param": None, "code": exc.status_code}}
        return JSONResponse(body, status_code=exc.status_code, headers=getattr(exc, "headers", None))

    app.add_middleware(_LastResort)

    @app.get("/health")
    async def health():
        if not service.healthy:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "base_model": service.base_name, "deltas": len(service.deltas())}

    @app.get("/metrics")
    async def metrics_endpoint():
        # in a thread: the ingress of engine replicas may read their snapshots from an object store
        return Response(await asyncio.to_thread(service.metrics_exposition), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models():
        data = [
            {
                "id": service.base_name,
                "object": "model",
                "created": created,
                "owned_by": "deltaserve",
                "root": service.base_name,
                "parent": None,
            }
        ]
        for d in service.deltas():
            data.append(
                {
                    "id": d.name,
                    "object": "model",
                    "created": int(d.registered_at),
                    "owned_by": "deltaserve",
                    "root": service.base_name,
                    "parent": service.base_name,
                    "kind": d.kind,
                    "description": d.manifest.task.description,
                }
            )
        data.append(
            {
                "id": AUTO,
                "object": "model",
                "created": created,
                "owned_by": "deltaserve",
                "root": service.base_name,
                "parent": None,
                "description": "automatic routing to a task expert or the base model",
            }
        )
        return {"object": "list", "data": data}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        body.check_unsupported("echo", "suffix", "best_of", "tools", "logit_bias")
        prompts = body.prompt if isinstance(body.prompt, list) else [body.prompt]
        if len(prompts) != 1 or not isinstance(prompts[0], str):
            raise InvalidRequestError("`prompt` must be one string (batches: send one request each)")
        image = _decode_image_url(body.image, "image") if body.image else None
        req = InferenceRequest(
            prompt=prompts[0],
            image=image,
            task=body.model,
            sampling=body.sampling(),
            request_id=_request_id(body, request),
            stream=body.stream,
            api="http",
        )
        return await _respond(req, body, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request):
        body.check_unsupported("tools", "tool_choice", "functions", "logit_bias")
        messages, image = _chat_messages(body.messages)
        req = InferenceRequest(
            messages=messages,
            image=image,
            task=body.model,
            sampling=body.sampling(),
            chat=True,
            request_id=_request_id(body, request),
            stream=body.stream,
            api="http",
        )
        return await _respond(req, body, request, chat=True)

    async def _respond(req: InferenceRequest, body: _Body, request: Request, *, chat: bool):
        """Run ``req`` and answer in OpenAI's shape: one JSON object, or server-sent events when ``stream``."""
        include_usage = body.include_usage()  # refuses bad stream_options before anything runs
        generation = await service.submit(req)
        routed = generation.routed
        events = _while_connected(request, aiter(generation), stream=body.stream)
        prefix, obj = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
        head = {
            "id": f"{prefix}-{routed.request_id}",
            "object": obj,
            "created": int(time.time()),
            "model": routed.expert,
        }
        headers = {"x-deltaserve-expert": routed.expert, "x-request-id": routed.request_id}
        if routed.replica is not None:
            headers["x-deltaserve-replica"] = routed.replica["replica"]
        if body.stream:
            return StreamingResponse(
                _stream(routed, events, head, generation.n, chat=chat, include_usage=include_usage),
                media_type="text/event-stream",
                headers=headers,
            )
        choices = []
        collected = await generation.collect(events)
        for c in collected:
            choice = _choice_json(c.index, c.text, c.logprobs, c.finish_reason, chat=chat, stream=False, offset=0)
            if body.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        usage = _usage(routed, sum(len(c.token_ids) for c in collected))
        return JSONResponse(
            {**head, "choices": choices, "usage": usage, "routing": _routing_json(routed)}, headers=headers
        )

    # ---- admin ------------------------------------------------------------------

    @app.get("/v1/engine")
    async def engine_state():
        """What the engine holds right now: its state and the LoRA adapters loaded in vLLM."""
        return await service.engine_state()

    @app.post("/v1/engine/verify")
    async def verify_engine(request: Request):
        """Admin: do the live base-state weights equal the base checkpoint? (read back from the engine)"""
        return await service.verify_base(token=_bearer(request))

    @app.get("/v1/deltas")
    async def list_deltas():
        return {"base_model": service.base_name, "deltas": [delta_json(d) for d in service.deltas()]}

    @app.get("/v1/deltas/{name}")
    async def get_delta(name: str):
        return delta_json(service.delta(name))

    @app.post("/v1/deltas")
    async def register_delta(request: Request):
        token = _bearer(request)
        service.check_admin(token)  # before decoding a possibly large body
        # Parsed here, not by FastAPI: a body may be as large as the bundle limit (a second of CPU per 150 MiB).
        length = request.headers.get("content-length")
        body = await parse_upload(
            request.stream(),
            length=int(length) if length and length.isdigit() else None,
            max_bytes=body_limit(service.upload_limits.max_bytes),
        )
        if body.files is not None:
            delta = await service.register(token=token, files=body.files, name=body.name)
        else:
            from pathlib import Path

            delta = await service.register(token=token, path=Path(body.path), name=body.name)
        return JSONResponse(delta_json(delta), status_code=201)

    @app.delete("/v1/deltas/{name}")
    async def delete_delta(name: str, request: Request):
        await service.unregister(name, token=_bearer(request))
        return {"name": name, "deleted": True}

    return app
