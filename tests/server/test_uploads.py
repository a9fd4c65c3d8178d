"""Uploaded bundles without vLLM: property-based tests (``hypothesis``) of file names and of the
manifest (``delta.json``) and task name of an upload, through the registry the service calls.

Whatever is refused must be refused with a typed client error (4xx, never another exception)
and leave nothing behind; whatever is accepted must satisfy the documented bounds. Bundles,
store and staging are real files; the engine is :class:`helpers.FakeEngine`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import shutil
from pathlib import Path, PurePosixPath

import psutil
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from helpers import FakeEngine, make_lora_bundle, make_peft_adapter

from deltaserve.plugins.bundle import MANIFEST_FILE
from deltaserve.plugins.manifest import (
    MAX_PATH_CHARS,
    MAX_PATH_COMPONENT_BYTES,
    MAX_PATH_COMPONENT_CHARS,
    MAX_PATH_DEPTH,
    task_name_problem,
)
from deltaserve.server.errors import status_of
from deltaserve.server.registry import DeltaRegistry

FUZZ = settings(max_examples=200, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def registry(tiny_base, tmp_path_factory) -> DeltaRegistry:
    return DeltaRegistry(
        tmp_path_factory.mktemp("uploads") / "store", tiny_base, FakeEngine(), max_bundle_bytes=1 << 20
    )


class _Uploads(dict):
    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return f"<uploads {sorted(self)}>"


@pytest.fixture(scope="module")
def uploads(tiny_base, tmp_path_factory) -> dict[str, list[tuple[str, bytes]]]:
    """Two valid uploads: a `lora` delta bundle and a plain PEFT adapter directory."""
    root = tmp_path_factory.mktemp("upload-sources")
    sources = {
        "bundle": make_lora_bundle(tiny_base, root / "bundle", "fuzzed", seed=1, examples=[]),
        "peft": make_peft_adapter(tiny_base, root / "peft", seed=2),
    }
    return _Uploads(
        {
            kind: [(p.relative_to(d).as_posix(), p.read_bytes()) for p in sorted(Path(d).rglob("*")) if p.is_file()]
            for kind, d in sources.items()
        }
    )


def _refused_as_client_error(exc: Exception) -> None:
    assert 400 <= status_of(exc)[1] < 500, f"{type(exc).__name__}: {exc}"
    event(f"refused: {type(exc).__name__}")


def _nothing_staged(registry: DeltaRegistry) -> None:
    assert list((registry.store / "staging").iterdir()) == []


# ---- file names ------------------------------------------------------------------------------

_segment = st.one_of(
    st.text(max_size=12),
    st.sampled_from([".", "..", "", "a", "b.md", " ", "\x00", "a\\b", "\ud800", "con", "delta.json"]),
    st.text(st.characters(max_codepoint=0x7F), min_size=120, max_size=140),
    st.text(st.characters(min_codepoint=0x10000), min_size=60, max_size=130),  # 4 UTF-8 bytes each
)
_name = st.one_of(
    st.lists(st.from_regex(r"[a-z0-9_.-]{1,12}", fullmatch=True), min_size=1, max_size=3).map("/".join),
    st.lists(_segment, min_size=1, max_size=MAX_PATH_DEPTH + 2).map("/".join),
    st.sampled_from(["a.md", "a.md/b.md", "/etc/passwd", "a//b", "a/./b", "./a", "a/", "../x"]),
)
_files = st.lists(st.tuples(_name, st.binary(max_size=8)), max_size=6)


def _examples(name_lists):
    def decorate(test):
        for names in name_lists:
            test = example(files=[(n, b"x") for n in names])(test)
        return test

    return decorate


# The rows, always run besides the random ones.
_KNOWN_BAD = [
    ["\U00010000" * 64],  # 64 characters, 256 bytes: over the file system's NAME_MAX
    ["a\ud800"],  # JSON can carry a lone surrogate
    ["a\x00b"],
    ["."],
    ["a/../b"],
    ["x" * 300],
    ["/".join(["d"] * 40)],
    ["a.md", "a.md/b.md"],
    ["a.md", "a.md"],
]


@FUZZ
@given(files=_files)
@_examples(_KNOWN_BAD)
def test_any_file_names_are_written_inside_staging_within_bounds_or_refused(registry, files):
    try:
        staging = registry.write_upload(files)
    except Exception as exc:
        _refused_as_client_error(exc)
        _nothing_staged(registry)
        return
    event("accepted")
    try:
        names = [rel for rel, _ in files]
        assert 0 < len(names) == len(set(names)) <= registry.limits.max_files
        for rel, data in files:
            parts = PurePosixPath(rel).parts
            assert len(rel) <= MAX_PATH_CHARS and 0 < len(parts) <= MAX_PATH_DEPTH
            assert all(0 < len(p) <= MAX_PATH_COMPONENT_CHARS and p not in (".", "..") for p in parts)
            assert all(len(p.encode()) <= MAX_PATH_COMPONENT_BYTES for p in parts)
            assert not any(ord(c) < 32 or ord(c) == 127 or c == "\\" for c in rel)
            target = staging / rel
            assert target.resolve().is_relative_to(staging.resolve()) and target.read_bytes() == data
        assert not {str(p) for rel in names for p in PurePosixPath(rel).parents} & set(names)  # no file/folder clash
    finally:
        shutil.rmtree(staging)


# ---- manifests and task names ----------------------------------------------------------------

_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=8)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8,
)


def _paths(obj, prefix=()):
    """Every key path of a JSON object (for choosing what to drop or replace)."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))


@st.composite
def _manifest(draw, valid: bytes) -> bytes:
    """The valid manifest, or it with one field dropped or replaced by any JSON value, any JSON, or any bytes."""
    how = draw(st.sampled_from(["keep", "drop", "replace", "replace", "json", "bytes"]))
    if how == "keep":
        return valid
    if how == "json":
        return json.dumps(draw(_json)).encode()
    if how == "bytes":
        return draw(st.binary(max_size=64))
    manifest = copy.deepcopy(json.loads(valid))
    *parents, key = draw(st.sampled_from(sorted(_paths(manifest))))
    holder = manifest
    for p in parents:
        holder = holder[p]
    if how == "drop":
        del holder[key]
    else:
        holder[key] = draw(_json)
    return json.dumps(manifest).encode()


_task_name = st.one_of(
    st.none(),
    st.from_regex(r"[a-z0-9][a-z0-9._-]{0,70}", fullmatch=True),  # valid up to 64 characters without `..`
    st.sampled_from(["", "beta", "a..b", FakeEngine.model_name, "-x", "A"]),
    st.text(max_size=70),
)


@FUZZ
@given(data=st.data(), name=_task_name)
def test_any_manifest_and_name_register_within_bounds_or_are_refused(registry, uploads, data, name):
    kind = data.draw(st.sampled_from(["bundle", "bundle", "peft"]), label="upload")
    files = dict(uploads[kind])
    if kind == "bundle":
        files[MANIFEST_FILE] = data.draw(_manifest(files[MANIFEST_FILE]), label="delta.json")
    before = (registry.names(), sorted(p.name for p in (registry.store / "deltas").iterdir()))

    async def register():
        staging = registry.write_upload(list(files.items()))
        return await registry.register(staging, name, staged=True)

    try:
        delta = asyncio.run(register())
    except Exception as exc:
        _refused_as_client_error(exc)
        assert (registry.names(), sorted(p.name for p in (registry.store / "deltas").iterdir())) == before
        _nothing_staged(registry)
        return
    event(f"accepted {kind}")
    try:
        # a plain PEFT adapter has no name of its own: the upload must name it
        expected = name or (json.loads(files[MANIFEST_FILE])["name"] if kind == "bundle" else None)
        assert delta.name == expected and task_name_problem(delta.name) is None
        assert delta.name != FakeEngine.model_name and registry.names() == sorted({*before[0], delta.name})
        _nothing_staged(registry)
    finally:
        asyncio.run(registry.unregister(delta.name))


def test_a_large_upload_body_is_parsed_in_a_child_like_a_small_one_in_process(monkeypatch):
    """``POST /v1/deltas`` bodies above ``IN_PROCESS_MAX`` are streamed into a child process that parses them (the
    parse holds the GIL for ~0.7 s per 100 MiB); the answer and every refusal must be the same as in-process, the
    event loop stays free meanwhile, and a body over the limit is refused as it arrives."""
    import base64
    import os
    import time

    from deltaserve.server import upload_body
    from deltaserve.server.errors import InvalidRequestError

    content = os.urandom(24 << 20)
    good = {"name": "big", "files": {"delta.json": base64.b64encode(b"{}").decode()}}
    good["files"]["w.safetensors"] = base64.b64encode(content).decode()
    bodies = {
        "good": json.dumps(good).encode(),
        "path": json.dumps({"path": "/x", "pad": "A" * (5 << 20)}).encode(),  # refused: unknown field
        "bad64": json.dumps({**good, "files": {**good["files"], "b": "QQ=!"}}).encode(),
        "twice": b'{"files": {"a": "QQ==", "a": "QUE="}, "name": "' + b"n" * (5 << 20) + b'"}',
        "both": json.dumps({**good, "path": "/x"}).encode(),
    }

    def answer(raw: bytes):
        gaps = []

        async def run():
            async def ticker():
                while True:
                    started = time.perf_counter()
                    await asyncio.sleep(0.005)
                    gaps.append(time.perf_counter() - started)

            async def chunks():  # as the HTTP server hands the body over
                for start in range(0, len(raw), 1 << 16):
                    yield raw[start : start + (1 << 16)]

            tick = asyncio.create_task(ticker())
            try:
                return await upload_body.parse_upload(chunks(), length=len(raw), max_bytes=1 << 30)
            except InvalidRequestError as exc:
                return f"refused: {exc}"
            finally:
                tick.cancel()

        return asyncio.run(run()), max(gaps, default=0)

    child = {}
    for key, raw in bodies.items():
        assert len(raw) > upload_body.IN_PROCESS_MAX
        child[key], gap = answer(raw)
        if key == "good":  # measured 0.01-0.07 s (the parse itself: 0.2 s here)
            assert gap < 0.1, f"the event loop stalled {gap:.2f} s while a child parsed the upload"
    assert child["good"] == upload_body.Upload("big", None, [("delta.json", b"{}"), ("w.safetensors", content)])
    assert child["path"].startswith("refused: invalid request body: `pad`"), child["path"]
    assert child["bad64"] == "refused: `files.b` is not valid base64"
    assert child["twice"].startswith("refused: the body names `a` more than once"), child["twice"]
    assert child["both"] == "refused: give exactly one of `files` (path → base64) or `path`"

    monkeypatch.setattr(upload_body, "IN_PROCESS_MAX", 1 << 40)  # the same bodies, parsed in a thread
    assert {key: answer(raw)[0] for key, raw in bodies.items()} == child

    from deltaserve.server.errors import ResourceExhaustedError

    async def endless():
        while True:
            yield b" " * (1 << 20)

    async def too_large(length):
        with pytest.raises(ResourceExhaustedError, match="the server takes at most 8388608"):
            await upload_body.parse_upload(endless(), length=length, max_bytes=8 << 20)

    asyncio.run(too_large(None))  # streamed: refused once past the limit (an endless body here)
    asyncio.run(too_large(9 << 20))  # declared: refused before reading
    parsers = [p for p in psutil.Process().children() if "deltaserve.server.upload_body" in p.cmdline()]
    assert not parsers, "an upload parser outlived its refusal"


def test_streamed_upload_pieces_become_files_and_are_refused_past_a_limit():
    """gRPC ``RegisterStream``: consecutive pieces of one path are one file; the size and file-count limits refuse
    an upload while it arrives, not after it was held whole."""
    from deltaserve.server.errors import InvalidRequestError, ResourceExhaustedError
    from deltaserve.server.upload_body import gather_pieces

    def gather(pieces, max_bytes=100, max_files=3):
        async def stream():
            for piece in pieces:
                yield piece

        return asyncio.run(gather_pieces(stream(), max_bytes=max_bytes, max_files=max_files))

    assert gather([("a", b"12"), ("a", b"34"), ("b", b""), ("a", b"5")]) == [("a", b"1234"), ("b", b""), ("a", b"5")]
    with pytest.raises(ResourceExhaustedError, match="limit is 100"):
        gather([("a", b"x" * 60), ("b", b"y" * 41)])
    with pytest.raises(InvalidRequestError, match="more than 3 files"):
        gather([(str(i), b"") for i in range(4)])
