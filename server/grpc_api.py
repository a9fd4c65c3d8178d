"""gRPC front end (``grpc.aio``): ``deltaserve.v1.Inference`` and ``deltaserve.v1.Registry``,
standard health checking and server reflection.

One interceptor (:class:`ErrorInterceptor`) turns typed errors into status codes; the
servicers only translate messages.
"""

from __future__ import annotations

import json
import logging

import asyncio

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from deltaserve.plugins.errors import DeltaServeError
from deltaserve.server.engine import TokenLogprob
from deltaserve.server.errors import InvalidRequestError, client_message, status_of
from deltaserve.server.registry import LiveDelta
from deltaserve.server.requests import InferenceRequest, SamplingFields
from deltaserve.server.service import DeltaService, Routed
from deltaserve.server.upload_body import gather_pieces
from deltaserve.v1 import deltaserve_pb2 as pb
from deltaserve.v1 import deltaserve_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Inference"].full_name,
    pb.DESCRIPTOR.services_by_name["Registry"].full_name,
)


def _token(context) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and value.startswith("Bearer "):
            return value.removeprefix("Bearer ").strip()
    return None


_OPTIONAL_SAMPLING = tuple(
    f.name
    for f in pb.SamplingParams.DESCRIPTOR.fields
    if f.has_presence and f.name in SamplingFields.__dataclass_fields__
)
"""The proto's ``optional`` sampling fields: unset means the server's default (None in :class:`SamplingFields`)."""


def _inference_request(msg: pb.GenerateRequest, *, stream: bool = True) -> InferenceRequest:
    s = msg.sampling
    sampling = SamplingFields(
        **{name: getattr(s, name) if s.HasField(name) else None for name in _OPTIONAL_SAMPLING},
        stop=list(s.stop),
        ignore_eos=s.ignore_eos,
        response_format=_response_format(s),
    )
    messages = None
    if msg.messages:
        messages = [{"role": m.role, "content": m.content} for m in msg.messages]
        if msg.image and messages[-1]["role"] == "user":
            messages[-1]["content"] = [{"type": "image"}, {"type": "text", "text": messages[-1]["content"]}]
    return InferenceRequest(
        messages=messages,
        prompt=msg.prompt,
        image=msg.image or None,
        task=msg.task or None,
        sampling=sampling,
        request_id=msg.request_id or None,
        chat=msg.chat,
        stream=stream,
        api="grpc",
    )


def _response_format(s: pb.SamplingParams) -> dict | None:
    """The proto's structured-output fields in OpenAI's ``response_format`` shape (validated in one place)."""
    if s.json_schema and s.json_object:
        raise InvalidRequestError("give at most one of `json_schema` and `json_object`")
    if s.json_schema:
        try:
            schema = json.loads(s.json_schema)
        except ValueError as exc:
            raise InvalidRequestError(f"`json_schema` is not valid JSON: {exc}") from None
        return {"type": "json_schema", "json_schema": {"schema": schema}}
    return {"type": "json_object"} if s.json_object else None


def _logprobs(entries: list[TokenLogprob] | None) -> list[pb.TokenLogprob]:
    return [
        pb.TokenLogprob(
            token_id=e.token_id,
            token=e.token,
            logprob=e.logprob,
            top=[pb.TopLogprob(token_id=t, token=tok, logprob=lp) for t, tok, lp in e.top],
        )
        for e in entries or ()
    ]


def _routing(routed: Routed) -> pb.Routing:
    d = routed.decision
    return pb.Routing(expert=routed.expert, router=d.router, score=d.score, reason=d.reason, scores=d.scores)


def delta_info(delta: LiveDelta) -> pb.DeltaInfo:
    manifest = delta.manifest
    return pb.DeltaInfo(
        name=delta.name,
        kind=delta.kind,
        description=manifest.task.description,
        binding=delta.binding.mode,
        base_fingerprint=manifest.base.fingerprint,
        content_digest=delta.digest,
        size_bytes=delta.size_bytes,
        registered_at=delta.registered_at,
        manifest_json=manifest.to_json(),
    )


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, service: DeltaService):
        self.service = service

    async def Generate(self, request, context):
        generation = await self.service.submit(_inference_request(request, stream=False))
        routed = generation.routed
        (choice,) = await generation.collect()
        return pb.GenerateResponse(
            request_id=routed.request_id,
            text=choice.text,
            token_ids=choice.token_ids,
            finish_reason=choice.finish_reason or "",
            routing=_routing(routed),
            usage=pb.Usage(prompt_tokens=routed.prompt_tokens, completion_tokens=len(choice.token_ids)),
            logprobs=_logprobs(choice.logprobs),
        )

    async def Route(self, request, context):
        return _routing(await self.service.route(_inference_request(request)))

    async def GenerateStream(self, request, context):
        generation = await self.service.submit(_inference_request(request))
        routed = generation.routed
        yield pb.GenerateChunk(request_id=routed.request_id, routing=_routing(routed))
        completion = 0
        async for event in generation:
            completion += len(event.token_ids)
            chunk = pb.GenerateChunk(
                request_id=routed.request_id,
                text=event.text,
                token_ids=event.token_ids,
                logprobs=_logprobs(event.logprobs),
            )
            if event.finished:
                chunk.finish_reason = event.finish_reason or ""
                chunk.usage.CopyFrom(pb.Usage(prompt_tokens=routed.prompt_tokens, completion_tokens=completion))
            yield chunk


class RegistryServicer(pb_grpc.RegistryServicer):
    def __init__(self, service: DeltaService):
        self.service = service

    async def Register(self, request, context):
        # Off the event loop: each `data` is a copy out of the parsed message (~30 ms per 100 MiB).
        files = await asyncio.to_thread(lambda: [(f.path, f.data) for f in request.files])
        delta = await self.service.register(token=_token(context), files=files, name=request.name or None)
        return delta_info(delta)

    async def RegisterStream(self, request_iterator, context):
        token = _token(context)
        self.service.check_admin(token)  # before receiving a possibly large upload
        first: list[str] = []

        async def pieces():
            async for chunk in request_iterator:
                if not first:
                    first.append(chunk.name)
                yield chunk.path, chunk.data

        limits = self.service.upload_limits
        files = await gather_pieces(pieces(), max_bytes=limits.max_bytes, max_files=limits.max_files)
        if not files:
            raise InvalidRequestError("the upload has no files")
        delta = await self.service.register(token=token, files=files, name=first[0] or None)
        return delta_info(delta)

    async def Unregister(self, request, context):
        await self.service.unregister(request.name, token=_token(context))
        return pb.UnregisterResponse(name=request.name)

    async def List(self, request, context):
        return pb.ListResponse(base_model=self.service.base_name, deltas=[delta_info(d) for d in self.service.deltas()])

    async def Get(self, request, context):
        return delta_info(self.service.delta(request.name))


class _Undecodable:
    """What the deserializer hands on when the request bytes are not a valid message (e.g. a non-UTF-8 string field)."""

    def __init__(self, exc: Exception):
        self.error = InvalidRequestError(f"the request is not a valid protobuf message: {exc}")


LARGE_MESSAGE_BYTES = 4 << 20
"""Requests above this size (bundle uploads) are parsed in a thread, not on the event loop that grpc calls the
deserializer on: a 96 MiB Register held the loop (and /health) 0.2-0.3 s."""


def _tolerant(deserialize):
    def parse(data: bytes):
        if len(data) > LARGE_MESSAGE_BYTES:
            return _Deferred(lambda: parse_now(data))
        return parse_now(data)

    def parse_now(data: bytes):
        try:
            return deserialize(data)
        except Exception as exc:  # protobuf's DecodeError: the client's fault, answered by the handler below
            return _Undecodable(exc)

    return parse


class _Deferred:
    """A large request, parsed by the handler wrapper below (off the event loop)."""

    def __init__(self, parse):
        self.parse = parse


async def _parsed(request):
    if isinstance(request, _Deferred):
        request = await asyncio.to_thread(request.parse)
    if isinstance(request, _Undecodable):
        raise request.error
    return request


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """Maps typed errors to status codes (``deltaserve.server.errors.status_of``); logs the rest.

    Undecodable request bytes become INVALID_ARGUMENT too (grpc would answer UNKNOWN).
    """

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        deserializer = _tolerant(handler.request_deserializer) if handler.request_deserializer else None
        if handler.unary_unary:
            inner = handler.unary_unary

            async def unary_unary(request, context):
                try:
                    return await inner(await _parsed(request), context)
                except Exception as exc:
                    await _abort(context, exc, handler_call_details.method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            async def unary_stream(request, context):
                try:
                    async for item in inner_stream(await _parsed(request), context):
                        yield item
                except Exception as exc:
                    await _abort(context, exc, handler_call_details.method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        if handler.stream_unary:
            inner_upload = handler.stream_unary

            async def stream_unary(request_iterator, context):
                async def requests():
                    async for request in request_iterator:
                        yield await _parsed(request)

                try:
                    return await inner_upload(requests(), context)
                except Exception as exc:
                    await _abort(context, exc, handler_call_details.method)

            return grpc.stream_unary_rpc_method_handler(
                stream_unary, request_deserializer=deserializer, response_serializer=handler.response_serializer
            )
        return handler


async def _abort(context, exc: Exception, method: str):
    if isinstance(exc, grpc.aio.AbortError):
        raise exc
    code, _, _ = status_of(exc)
    if not isinstance(exc, DeltaServeError):
        log.exception("internal error in %s", method, exc_info=exc)
    await context.abort(code, client_message(exc))


class _Health(HealthServicer):
    """Standard health checking, answered from :attr:`DeltaService.healthy` (as HTTP ``/health``): a dead engine is NOT_SERVING."""

    def __init__(self, service: DeltaService):
        super().__init__()
        self.service = service

    async def Check(self, request, context):
        if not self.service.healthy:
            return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.NOT_SERVING)
        return await super().Check(request, context)


class GrpcFrontEnd:
    def __init__(self, service: DeltaService, max_message_bytes: int):
        self.server = grpc.aio.server(
            interceptors=[ErrorInterceptor()],
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
                ("grpc.so_reuseport", 0),
            ],
        )
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(service), self.server)
        pb_grpc.add_RegistryServicer_to_server(RegistryServicer(service), self.server)
        self.health = _Health(service)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )

    async def start(self, host: str, port: int) -> int:
        bound = self.server.add_insecure_port(f"{host}:{port}")
        if bound == 0:
            raise OSError(f"could not bind gRPC to {host}:{port}")
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def stop_accepting(self) -> None:
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float | None) -> None:
        await self.server.stop(grace)
