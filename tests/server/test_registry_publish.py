"""The registry publishes a new delta set only after its ``before_publish`` hook (the router) is
ready, and a crash at any point of a registration or unregistration leaves a store that restarts
consistent.

Engine-free: the registry's LoRA binding talks to a small fake engine (the thing under test
is the registry's ordering and its files, not vLLM); bundles, store and index are real files.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from helpers import FakeEngine, make_lora_bundle

from deltaserve.plugins.bundle import content_digest
from deltaserve.server import registry as registry_module
from deltaserve.server.registry import INDEX_FILE, DeltaRegistry


def test_router_is_ready_before_requests_see_a_registration_or_an_unregistration(tiny_base, tmp_path):
    bundle = make_lora_bundle(tiny_base, tmp_path / "bundle", "alpha", seed=1, examples=[])
    events = []

    async def scenario():
        registry = DeltaRegistry(tmp_path / "store", tiny_base, FakeEngine(), max_bundle_bytes=1 << 30)

        async def before_publish(deltas):
            names = [d.name for d in deltas]
            events.append(("prepare", names, registry.names()))
            await asyncio.sleep(0.05)  # a slow router retrain: the registry must not publish meanwhile
            events.append(("prepared", names, registry.names()))
            return lambda: events.append(("commit", names, registry.names()))

        registry.before_publish = before_publish
        await registry.register(bundle)
        events.append(("registered", None, registry.names()))
        await registry.unregister("alpha")
        events.append(("unregistered", None, registry.names()))

    asyncio.run(scenario())
    assert events == [
        ("prepare", ["alpha"], []),
        ("prepared", ["alpha"], []),
        ("commit", ["alpha"], []),  # the router installs its new state while requests still see the old set
        ("registered", None, ["alpha"]),
        ("prepare", [], ["alpha"]),
        ("prepared", [], ["alpha"]),
        ("commit", [], ["alpha"]),
        ("unregistered", None, []),
    ]


def test_a_failing_router_update_changes_nothing(tiny_base, tmp_path):
    bundle = make_lora_bundle(tiny_base, tmp_path / "bundle", "alpha", seed=1, examples=[])

    async def scenario():
        registry = DeltaRegistry(tmp_path / "store", tiny_base, FakeEngine(), max_bundle_bytes=1 << 30)

        async def broken(deltas):
            raise RuntimeError("router training failed")

        registry.before_publish = broken
        try:
            await registry.register(bundle)
        except RuntimeError:
            pass
        return registry.names(), sorted(p.name for p in (tmp_path / "store" / "deltas").iterdir())

    names, stored = asyncio.run(scenario())
    assert names == [] and stored == []


def _upload(bundle: Path) -> list[tuple[str, bytes]]:
    return [(p.relative_to(bundle).as_posix(), p.read_bytes()) for p in sorted(bundle.rglob("*")) if p.is_file()]


# (crash point, operation on a store holding alpha v1, what a restart must find: alpha's version or None)
CRASHES = [
    ("staged", "register", "v1"),  # the upload is written to staging; registration never started
    ("stored", "register", "v1"),  # the bundle is in deltas/, the index does not name it
    ("index-written", "register", "v1"),  # the new index is written and fsync'ed but not renamed into place
    ("indexed", "register", "v2"),  # the index names v2; nothing was published yet
    ("index-written", "unregister", "v1"),
    ("unindexed", "unregister", None),  # the index no longer names alpha; its files are still there
]


@pytest.mark.parametrize(("point", "operation", "survivor"), CRASHES, ids=[f"{o}-{p}" for p, o, _ in CRASHES])
def test_a_crash_leaves_a_store_that_restarts_consistent(tiny_base, tmp_path, monkeypatch, point, operation, survivor):
    """A crash is simulated by copying the store at the crash point: with every write fsync'ed,
    that copy is what a SIGKILL there leaves on disk. The registry then carries on (so the crash
    point is really reached past the copy) and a new registry restores the copy."""
    bundles = {
        v: make_lora_bundle(tiny_base, tmp_path / v, "alpha", seed=seed, examples=[])
        for v, seed in (("v1", 1), ("v2", 2))
    }
    digests = {v: content_digest(b) for v, b in bundles.items()}
    store, crashed = tmp_path / "store", tmp_path / "crashed"

    def crash_here(reached: str) -> None:
        if reached == point and not crashed.exists():
            shutil.copytree(store, crashed)

    async def fault_point(reached: str, task: str) -> None:
        crash_here(reached)

    real_replace = os.replace

    def replace(src, dst):
        if Path(dst).name == INDEX_FILE:
            crash_here("index-written")
        real_replace(src, dst)

    async def scenario():
        registry = DeltaRegistry(store, tiny_base, FakeEngine(), max_bundle_bytes=1 << 30)
        await registry.register(bundles["v1"])
        monkeypatch.setattr(registry_module, "_fault_point", fault_point)
        monkeypatch.setattr(os, "replace", replace)
        if operation == "register":
            staging = registry.write_upload(_upload(bundles["v2"]))
            crash_here("staged")
            await registry.register(staging, staged=True)
        else:
            await registry.unregister("alpha")
        await registry.close()

    async def restart():
        registry = DeltaRegistry(crashed, tiny_base, FakeEngine(), max_bundle_bytes=1 << 30)
        return registry, await registry.restore()

    asyncio.run(scenario())
    monkeypatch.undo()
    assert crashed.exists(), f"crash point `{point}` was never reached"
    registry, problems = asyncio.run(restart())
    assert problems == []
    expected = {"alpha": digests[survivor]} if survivor else {}
    assert {d.name: d.digest for d in registry.list()} == expected
    assert {d.name: content_digest(d.path) for d in registry.list()} == expected  # the files are that version
    assert sorted(p.name for p in (crashed / "deltas").iterdir()) == sorted(d.path.name for d in registry.list())
    assert list((crashed / "staging").iterdir()) == []
    assert sorted(p.name for p in crashed.iterdir()) == sorted(["deltas", "staging", INDEX_FILE])
