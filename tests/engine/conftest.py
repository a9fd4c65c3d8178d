"""One in-process vLLM engine (``AsyncLLM`` through :class:`deltaserve.server.engine.Engine`) per session."""

from __future__ import annotations

import pytest

from deltaserve.server.config import EngineConfig


@pytest.fixture(scope="session")
async def engine(tiny_base):
    from deltaserve.server.engine import Engine

    eng = await Engine.start(EngineConfig(model=str(tiny_base), max_loras=2, kv_cache_memory_bytes=128 * 1024 * 1024))
    yield eng
    eng.shutdown()
