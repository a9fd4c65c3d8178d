"""How a registered delta is attached to the running engine.

A *binding* is created when a delta is registered (or restored) and released when
it is unregistered or replaced. The kind decides the engine side
(:attr:`DeltaKind.engine <deltaserve.plugins.kind.DeltaKind.engine>`), the server
never names a kind:

- ``vllm_lora`` kinds: the adapter directory is loaded into vLLM's multi-LoRA and
  requests carry a ``LoRARequest`` (:class:`LoraBinding`).
- ``plan`` kinds: the kind's serving plan is staged in vLLM's worker
  (:class:`PlanBinding`, :mod:`deltaserve.server.worker_extension`). By policy it is
  served **concurrently** — in the shared batch, its requests tagged so that only
  their rows see the delta — or, for a delta above the per-delta memory budget
  (``--concurrent-delta-budget``) or one that touches tensors no per-row computation
  serves, as an **exclusive** engine state that the scheduler switches into.
"""

from __future__ import annotations

import itertools
import logging
from abc import ABC, abstractmethod
from pathlib import Path

from deltaserve.plugins.registry import get_kind
from deltaserve.server.errors import EngineBindError

log = logging.getLogger(__name__)

BASE_STATE = "base"
"""The engine state of the untouched base model (also where concurrent deltas run)."""


class Binding(ABC):
    """One delta version attached to the engine."""

    def __init__(self, name: str, digest: str, path: Path, **context):
        self.name, self.digest, self.path = name, digest, path
        self.version = f"{name}@{digest.removeprefix('sha256:')[:12]}"
        """Unique per content: a re-registered task never shares a slot, state or cached block with its old weights."""

    @property
    def mode(self) -> str:
        """``concurrent`` (shares the batch with base traffic) or ``exclusive`` (its own engine state)."""
        return "concurrent"

    @property
    def state(self) -> str:
        """Engine state the delta's requests need (:data:`BASE_STATE` unless exclusive)."""
        return BASE_STATE

    @property
    def serving(self) -> dict:
        """How the engine serves the delta (``GET /v1/deltas``): mode, and for plan deltas why a state was
        chosen, the layers they change and the bytes they hold."""
        return {"mode": self.mode}

    def lora_request(self):
        """The ``LoRARequest`` requests of this delta carry, or None."""
        return None

    @property
    def tag(self) -> str | None:
        """The tag the delta's requests carry to the worker (concurrent plan deltas), or None."""
        return None

    @property
    def salt(self) -> str | None:
        """Prefix- and encoder-cache salt of the delta's requests (vLLM keys LoRA requests itself)."""
        return None

    @abstractmethod
    async def bind(self, engine) -> None:
        """Attach to the engine; raise :class:`EngineBindError` if the engine refuses."""

    @abstractmethod
    async def unbind(self, engine) -> None:
        """Detach (called once no request of this version is in flight)."""


_lora_ids = itertools.count(1)


class LoraBinding(Binding):
    """vLLM multi-LoRA. Each version gets a fresh id and a name containing its digest, so a
    re-registered task never shares an adapter slot or prefix-cache blocks with its
    previous weights (vLLM keys cached blocks by adapter name and path)."""

    def __init__(self, name: str, digest: str, path: Path, *, kind: str, **context):
        super().__init__(name, digest, path)
        from vllm.lora.request import LoRARequest

        self._request = LoRARequest(self.version, next(_lora_ids), str(get_kind(kind)().lora_dir(path)))

    def lora_request(self):
        return self._request

    async def bind(self, engine) -> None:
        if not engine.config.enable_lora:
            raise EngineBindError(f"cannot serve LoRA delta `{self.name}`: the server runs without LoRA (--no-lora)")
        try:
            await engine.add_lora(self._request)
        except Exception as exc:  # vLLM reports worker-side refusals as a plain Exception
            reason = str(exc).replace(
                str(self.path), f"`{self.name}`"
            )  # vLLM names the adapter by its path in the store
            raise EngineBindError(f"the engine refused LoRA delta `{self.name}`: {reason}") from None

    async def unbind(self, engine) -> None:
        await engine.remove_lora(self._request.lora_int_id)
        # Belt and braces: nothing may ever reuse KV blocks computed with these weights.
        await engine.reset_prefix_cache()


class WorkerDeltas:
    """Stages, switches and unstages plan deltas in vLLM's worker (the API-process side)."""

    def __init__(self, engine, budget_bytes: int):
        self.engine = engine
        self.budget_bytes = budget_bytes
        """Largest resident size of a delta served in the shared batch; larger ones become exclusive states."""
        self.on_unstaged = lambda state: None
        """Set by the service: tells the scheduler a state is gone (the worker reverted it if active)."""

    async def stage(self, tag: str, kind: str, path: Path, config: dict) -> dict:
        try:
            return await self.engine.worker_call("ds_stage", tag, kind, str(path), config, self.budget_bytes)
        except Exception as exc:  # the worker reports refusals as a plain Exception
            raise EngineBindError(f"the engine could not stage `{tag.split('@')[0]}`: {exc}") from None

    async def switch(self, state: str) -> None:
        """The scheduler's switch: called only while no request runs in the engine."""
        await self.engine.worker_call("ds_activate", state)

    async def unstage(self, tag: str) -> None:
        await self.engine.worker_call("ds_unstage", tag)
        self.on_unstaged(tag)

    async def live_hashes(self) -> dict[str, str]:
        return await self.engine.worker_call("ds_live_hashes")


class PlanBinding(Binding):
    """A delta served through its kind's serving plan, concurrently or (by policy) as an exclusive state."""

    def __init__(
        self,
        name: str,
        digest: str,
        path: Path,
        *,
        kind: str,
        worker: WorkerDeltas | None = None,
        config: dict | None = None,
    ):
        super().__init__(name, digest, path)
        self.kind = kind
        self._worker = worker
        self._config = config or {}
        self._mode = "concurrent"
        self.summary: dict = {}
        """The worker's report: mode, reason for an exclusive state, layers, resident bytes."""

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def state(self) -> str:
        return self.version if self._mode == "exclusive" else BASE_STATE

    @property
    def tag(self) -> str | None:
        return self.version if self._mode == "concurrent" else None

    @property
    def serving(self) -> dict:
        return dict(self.summary)

    @property
    def salt(self) -> str | None:
        return self.version

    async def bind(self, engine) -> None:
        if self._worker is None:
            raise EngineBindError(
                f"cannot serve {self.kind} delta `{self.name}`: the server runs without the worker extension (--no-exclusive)"
            )
        self.summary = await self._worker.stage(self.version, self.kind, self.path, self._config)
        self._mode = self.summary["mode"]
        log.info("staged %s: %s", self.version, self.summary)

    async def unbind(self, engine) -> None:
        await self._worker.unstage(self.version)


class DeferredBinding(Binding):
    """A version that engine replicas bind on demand, each its own (the ingress of ``deltaserve serve --replicas``,
    which has no engine): nothing to attach here."""

    @property
    def mode(self) -> str:
        return "on_demand"

    async def bind(self, engine) -> None:
        pass

    async def unbind(self, engine) -> None:
        pass


def binding_for(kind: str, name: str, digest: str, path: Path, *, deferred: bool = False, **context) -> Binding:
    """``context``: what a binding may need besides the bundle (``worker=``, ``config=`` …); ``deferred``: a
    :class:`DeferredBinding` (the kind is still checked to be servable)."""
    try:
        engine = get_kind(kind).engine
    except Exception as exc:
        raise EngineBindError(f"delta kind `{kind}` cannot be served: {exc}") from None
    if deferred:
        return DeferredBinding(name, digest, path)
    cls = LoraBinding if engine == "vllm_lora" else PlanBinding
    return cls(name, digest, path, kind=kind, **context)
