"""What the sync and asyncio clients share: request building, bundle upload, result types."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from deltaserve.v1 import deltaserve_pb2 as pb

DEFAULT_SERVER = "127.0.0.1:50051"
MAX_MESSAGE_BYTES = 512 * 1024 * 1024 + (4 << 20)
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class DeltaClientError(Exception):
    """A call failed; ``code`` is the gRPC status code, ``message`` the server's explanation."""

    def __init__(self, code: grpc.StatusCode, message: str):
        self.code, self.message = code, message
        super().__init__(f"{code.name}: {message}")


def client_error(exc: grpc.RpcError) -> DeltaClientError:
    return DeltaClientError(exc.code(), exc.details() or "")


@dataclass
class Routing:
    expert: str
    router: str
    score: float
    reason: str
    scores: dict[str, float]
    """The router's score of every candidate (empty for explicit routing)."""

    @classmethod
    def from_pb(cls, r: pb.Routing) -> Routing:
        return cls(r.expert, r.router, r.score, r.reason, dict(r.scores))

    def describe(self) -> str:
        scores = ", ".join(f"{k} {v:.2f}" for k, v in sorted(self.scores.items(), key=lambda kv: -kv[1]))
        return f"[{self.expert} via {self.router}, score {self.score:.2f}: {self.reason}]" + (
            f"\n[scores: {scores}]" if scores else ""
        )


@dataclass
class Generation:
    request_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    routing: Routing
    prompt_tokens: int
    completion_tokens: int
    logprobs: list[tuple[str, float]]
    """(token, log-probability) per generated token when ``logprobs`` was asked for; else empty."""

    @classmethod
    def from_pb(cls, r: pb.GenerateResponse) -> Generation:
        logprobs = [(e.token, e.logprob) for e in r.logprobs]
        return cls(
            r.request_id,
            r.text,
            list(r.token_ids),
            r.finish_reason,
            Routing.from_pb(r.routing),
            r.usage.prompt_tokens,
            r.usage.completion_tokens,
            logprobs,
        )


def image_bytes(image: Any) -> bytes:
    """Accept bytes, a path, or a PIL image; return encoded bytes (PNG for PIL images)."""
    if image is None:
        return b""
    if isinstance(image, bytes | bytearray):
        return bytes(image)
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


SAMPLING_FIELDS = frozenset(f.name for f in pb.SamplingParams.DESCRIPTOR.fields)
"""Keyword arguments :func:`generate_request` takes as sampling parameters (``SamplingParams`` in the proto)."""


def generate_request(
    prompt: str,
    *,
    image: Any = None,
    task: str | None = None,
    chat: bool = False,
    request_id: str | None = None,
    messages: list[dict[str, str]] | None = None,
    **sampling: Any,
) -> pb.GenerateRequest:
    """``messages`` (``{"role", "content"}`` dicts) send a whole conversation instead of ``prompt``.

    ``sampling``: fields of the proto's ``SamplingParams`` — ``max_tokens``, ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``seed``, ``stop``, ``ignore_eos``, ``min_tokens``, the
    presence/frequency/repetition penalties, ``logprobs``, ``json_schema`` (a dict or JSON text),
    ``json_object``; None means unset (the server's default).
    """
    unknown = sorted(set(sampling) - SAMPLING_FIELDS)
    if unknown:
        raise TypeError(f"unknown sampling parameter(s) {unknown}; known: {sorted(SAMPLING_FIELDS)}")
    if isinstance(sampling.get("json_schema"), dict):
        sampling["json_schema"] = json.dumps(sampling["json_schema"])
    params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
    turns = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages or ()]
    return pb.GenerateRequest(
        prompt=prompt,
        image=image_bytes(image),
        task=task or "",
        sampling=params,
        request_id=request_id or "",
        chat=chat,
        messages=turns,
    )


UPLOAD_PIECE_BYTES = 1 << 20
"""``RegisterStream`` messages carry at most this much of a file."""


def register_chunks(bundle_dir: str | os.PathLike, name: str | None = None) -> Iterator[pb.RegisterChunk]:
    """The ``RegisterStream`` messages for every regular file of a bundle (or PEFT adapter) directory, with POSIX
    relative paths; files are read piece by piece as the messages are sent. Refuses symlinks before sending any."""
    root = Path(bundle_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a directory")
    paths = []
    for path in sorted(root.rglob("*")):
        if path.is_symlink():
            raise ValueError(f"{path}: symlinks are not uploaded")
        if path.is_file():
            paths.append(path)

    def chunks():
        first = True
        for path in paths:
            rel = path.relative_to(root).as_posix()
            with open(path, "rb") as f:
                data = f.read(UPLOAD_PIECE_BYTES)
                while True:
                    yield pb.RegisterChunk(path=rel, data=data, name=(name or "") if first else "")
                    first = False
                    data = f.read(UPLOAD_PIECE_BYTES)
                    if not data:
                        break

    return chunks()


def metadata(admin_token: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {admin_token}")] if admin_token else None
