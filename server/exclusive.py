"""Exclusive deltas (sparse, bottleneck) on the running engine: the API-process side.

A registered exclusive delta is *staged* in vLLM's worker (its patch is built once:
repacked GEMMs, adapter wrappers, patched tensors) and becomes active only when the
scheduler switches the engine into its state; switching back to the base restores
the base exactly (see :mod:`deltaserve.server.worker_patches`). This module turns
those worker calls into :class:`~deltaserve.server.bindings.Binding` objects and the
scheduler's ``switch`` function.
"""

from __future__ import annotations

import logging
from pathlib import Path

from deltaserve.server.bindings import BINDINGS, Binding
from deltaserve.server.errors import EngineBindError

log = logging.getLogger(__name__)


class ExclusiveStates:
    """Stages, activates and unstages exclusive deltas in the worker."""

    def __init__(self, engine):
        self.engine = engine
        self.on_unstaged = lambda state: None
        """Set by the service: tells the scheduler a state is gone (the worker reverted it if active)."""

    async def stage(self, state: str, kind: str, path: Path, config: dict) -> dict:
        try:
            return await self.engine.worker_call("ds_stage", state, kind, str(path), config)
        except Exception as exc:  # the worker reports refusals as a plain Exception
            raise EngineBindError(f"the engine could not stage `{state.split('@')[0]}`: {exc}") from None

    async def switch(self, state: str) -> None:
        """The scheduler's switch: called only while no request runs in the engine."""
        await self.engine.worker_call("ds_activate", state)

    async def unstage(self, state: str) -> None:
        await self.engine.worker_call("ds_unstage", state)
        self.on_unstaged(state)

    async def live_hashes(self) -> dict[str, str]:
        return await self.engine.worker_call("ds_live_hashes")


class ExclusiveBinding(Binding):
    """A sparse or bottleneck delta: its own engine state, named ``<task>@<digest prefix>``
    so that a re-registered task never shares a state (or a stale patch) with its old weights."""

    kind = ""

    def __init__(
        self,
        name: str,
        digest: str,
        path: Path,
        *,
        exclusive: ExclusiveStates | None = None,
        config: dict | None = None,
    ):
        super().__init__(name, digest, path)
        self._exclusive = exclusive
        self._config = config or {}
        self._state = f"{name}@{digest.removeprefix('sha256:')[:12]}"

    @property
    def state(self) -> str:
        return self._state

    async def bind(self, engine) -> None:
        if self._exclusive is None:
            raise EngineBindError(
                f"cannot serve {self.kind} delta `{self.name}`: the server runs without exclusive deltas (--no-exclusive)"
            )
        summary = await self._exclusive.stage(self._state, self.kind, self.path, self._config)
        log.info("staged %s: %s", self._state, summary)

    async def unbind(self, engine) -> None:
        await self._exclusive.unstage(self._state)


class SparseBinding(ExclusiveBinding):
    kind = "sparse"


class BottleneckBinding(ExclusiveBinding):
    kind = "bottleneck"


BINDINGS.update({"sparse": SparseBinding, "bottleneck": BottleneckBinding})
