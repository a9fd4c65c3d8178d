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
