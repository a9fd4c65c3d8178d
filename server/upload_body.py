"""``POST /v1/deltas`` bodies: parsed, checked and base64-decoded without stalling the server.

An upload is JSON with the bundle's files as base64 strings, as large as the bundle limit allows (512 MiB by
default). Parsing it costs about 0.7 s of CPU per 100 MiB (measured: JSON scan 0.08 s, duplicate-key scan
0.21 s, base64 decode 0.37 s for a 96 MiB file), all inside C calls that hold the GIL. In a thread of the
server that stalls the event loop — ``/health`` and every stream — for as long. So a body above
:data:`IN_PROCESS_MAX` is streamed, as it arrives, into a child process (``python -m deltaserve.server.upload_body``)
that parses it: the server only moves bytes between its socket and pipes, in 1 MiB steps on the event loop, and
never holds the whole body. Smaller bodies (most LoRA and sparse deltas) are parsed in a thread, where they hold
the GIL for a few ms. A body larger than the bundle limit allows (:func:`body_limit`) is refused before or while
it arrives.

Both paths run the same :func:`parse`. The child answers one JSON line — ``{"name", "path", "files": [[path,
size], …]}`` or ``{"invalid": message}``, after its length in 8 bytes — followed by the files' bytes in order.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import sys
from collections.abc import AsyncIterable
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

from deltaserve.server.errors import InvalidRequestError, ResourceExhaustedError

IN_PROCESS_MAX = 4 << 20
"""Bodies up to this many bytes are parsed in a thread of the server (≈ 30 ms of CPU), larger ones in a child."""


class RegisterBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    files: dict[str, str] | None = None
    """Bundle files: relative path → base64 content."""
    path: str | None = None
    """Alternatively a bundle directory on the server's file system."""


@dataclass
class Upload:
    name: str | None
    path: str | None
    files: list[tuple[str, bytes | bytearray]] | None
    """Decoded bundle files (relative path, content), or None for a path-mode registration."""


def parse(raw: bytes) -> Upload:
    """The body, validated and decoded; :class:`InvalidRequestError` names what is wrong. CPU-bound."""
    try:
        body = RegisterBody.model_validate_json(raw)
    except ValidationError as exc:  # worded like the front end's answer to any other invalid body
        problems = "; ".join(f"`{'.'.join(str(p) for p in e['loc'])}`: {e['msg']}" for e in exc.errors())
        raise InvalidRequestError(f"invalid request body: {problems}") from None
    if (body.files is None) == (body.path is None):
        raise InvalidRequestError("give exactly one of `files` (path → base64) or `path`")
    if body.name is not None and not body.name.strip():
        raise InvalidRequestError("`name` must not be empty (omit it to use the bundle's own name)")
    if body.files is None:
        return Upload(body.name, body.path, None)
    if duplicated := _duplicate_keys(raw):
        raise InvalidRequestError(
            f"the body names {', '.join(f'`{k}`' for k in duplicated)} more than once (in `files`: one entry per path)"
        )
    files = []
    for rel, data in body.files.items():
        try:
            files.append((rel, base64.b64decode(data, validate=True)))
        except (binascii.Error, ValueError):
            raise InvalidRequestError(f"`files.{ascii(rel)[1:-1][:80]}` is not valid base64") from None
    return Upload(body.name, None, files)


def _duplicate_keys(raw: bytes) -> list[str]:
    """Keys given twice in one object of a JSON body (JSON allows it; the last would silently win)."""
    found: list[str] = []

    def pairs(items):
        keys = [k for k, _ in items]
        found.extend(sorted({k for k in keys if keys.count(k) > 1}))
        return dict(items)

    json.loads(raw, object_pairs_hook=pairs)
    return found


def body_limit(max_bundle_bytes: int) -> int:
    """The largest body that can hold a bundle of ``max_bundle_bytes``: base64 (4/3) plus room for the JSON around it
    (names of up to a few thousand files)."""
    return max_bundle_bytes * 4 // 3 + (8 << 20)


async def parse_upload(chunks: AsyncIterable[bytes], *, length: int | None, max_bytes: int) -> Upload:
    """:func:`parse` a body arriving as ``chunks`` off the event loop: in a thread when the declared ``length`` is small,
    else streamed into a child process as it arrives (never held whole in the server). A body longer than ``max_bytes``
    is refused before it is read (declared length) or as soon as it passes the limit."""
    if length is not None and length > max_bytes:
        raise _too_large(length, max_bytes)
    if length is not None and length <= IN_PROCESS_MAX:
        raw = b"".join([chunk async for chunk in chunks])
        return await asyncio.to_thread(parse, raw)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        __name__,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        limit=_STEP,
        start_new_session=True,  # a signal to the server's group must not kill an upload the drain lets finish
    )
    feeding = asyncio.create_task(_feed(proc.stdin, chunks, max_bytes))
    try:
        try:
            answer_size = int.from_bytes(await _first(proc.stdout.readexactly(8), feeding))
            answer = json.loads(await proc.stdout.readexactly(answer_size))
            files = [(rel, await _read_into(proc.stdout, size)) for rel, size in answer.get("files") or ()]
            await feeding
        except (asyncio.IncompleteReadError, ConnectionError) as exc:  # the child died (out of memory, killed)
            await proc.wait()
            err = (await proc.stderr.read()).decode(errors="replace")[-500:]
            raise RuntimeError(f"the upload parser exited with {proc.returncode} ({exc!r}): {err}") from None
    finally:
        feeding.cancel()
        if proc.returncode is None:  # cancelled (client gone, shutdown), refused, or done: leave no child behind
            proc.kill()
        await proc.wait()
    if "invalid" in answer:
        raise InvalidRequestError(answer["invalid"])
    return Upload(answer["name"], answer["path"], files if answer["files"] is not None else None)


def _too_large(size: int, max_bytes: int, *, so_far: bool = False) -> ResourceExhaustedError:
    return ResourceExhaustedError(
        f"the request body is {'at least ' if so_far else ''}{size} bytes; the server takes at most "
        f"{max_bytes} (its bundle limit, base64-encoded)"
    )


async def _first(read, feeding: asyncio.Task):
    """``read``'s result; if feeding the child fails first (the body is too large, the client went away), that error."""
    read = asyncio.ensure_future(read)
    await asyncio.wait({read, feeding}, return_when=asyncio.FIRST_COMPLETED)
    if feeding.done() and feeding.exception() is not None:
        read.cancel()
        raise feeding.exception()
    return await read


_STEP = 1 << 20
"""Pipe reads and writes go in steps of at most this many bytes: each holds the event loop for well under 1 ms
(copying the whole body at once held it 40-100 ms at 100 MiB)."""


async def _feed(stdin: asyncio.StreamWriter, chunks: AsyncIterable[bytes], max_bytes: int) -> None:
    total = 0
    async for chunk in chunks:
        total += len(chunk)
        if total > max_bytes:
            raise _too_large(total, max_bytes, so_far=True)
        view = memoryview(chunk)
        for start in range(0, len(view), _STEP):
            stdin.write(view[start : start + _STEP])
            await stdin.drain()
    stdin.close()


async def _read_into(stdout: asyncio.StreamReader, size: int) -> bytearray:
    out = bytearray(size)
    view, got = memoryview(out), 0
    while got < size:
        chunk = await stdout.read(min(size - got, _STEP))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(view[:got]), size)
        view[got : got + len(chunk)] = chunk
        got += len(chunk)
    return out


async def gather_pieces(
    pieces: AsyncIterable[tuple[str, bytes]], *, max_bytes: int, max_files: int
) -> list[tuple[str, bytearray]]:
    """Files from ``(path, data)`` pieces (a file's pieces in order, a new path starts the next file), as gRPC's
    ``RegisterStream`` sends them; refused as soon as they pass the size or file-count limit."""
    files: list[tuple[str, bytearray]] = []
    total = 0
    async for path, data in pieces:
        if not files or files[-1][0] != path:
            if len(files) == max_files:
                raise InvalidRequestError(f"the upload has more than {max_files} files; a bundle holds at most that")
            files.append((path, bytearray()))
        total += len(data)
        if total > max_bytes:
            raise ResourceExhaustedError(f"the upload is more than {total} bytes; the server's limit is {max_bytes}")
        files[-1][1].extend(data)
    return files


def _child() -> None:
    """Read a body on stdin, answer on stdout: the answer's length (8 bytes), the answer as JSON, the files."""
    out = sys.stdout.buffer
    try:
        upload = parse(sys.stdin.buffer.read())
        files = upload.files or []
        sizes = None if upload.files is None else [[rel, len(data)] for rel, data in files]
        answer = {"name": upload.name, "path": upload.path, "files": sizes}
    except InvalidRequestError as exc:
        files, answer = [], {"invalid": str(exc)}
    header = json.dumps(answer).encode()
    out.write(len(header).to_bytes(8) + header)
    for _, data in files:
        out.write(data)
    out.flush()


if __name__ == "__main__":
    _child()
