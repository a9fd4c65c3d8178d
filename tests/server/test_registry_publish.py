"""The registry publishes a new delta set only after its ``before_publish`` hook (the router) is ready.

Engine-free: the registry's LoRA binding talks to a small fake engine (the thing under test
is the registry's ordering, not vLLM); bundles, store and index are real files.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from helpers import make_lora_bundle

from deltaserve.server.registry import DeltaRegistry


class FakeEngine:
    model_name = "tiny-llava"
    config = SimpleNamespace(enable_lora=True)

    async def add_lora(self, request):
        return True

    async def remove_lora(self, lora_id):
        return True

    async def reset_prefix_cache(self):
        return None


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
