"""How a registered delta is attached to the running engine, per kind.

A *binding* is created when a delta is registered (or restored) and released when
it is unregistered or replaced. Two families, as DESIGN.md §Plugins describes:

- **concurrent** (LoRA): the adapter is loaded into vLLM and requests carry a
  ``LoRARequest``; they share the engine's base state with base traffic.
- **exclusive** (sparse, bottleneck): the delta is staged in the worker and becomes
  active only when the scheduler switches the engine into its *state*.

The kind → binding table is :data:`BINDINGS` (``lora`` here, ``sparse`` and
``bottleneck`` in :mod:`deltaserve.server.exclusive`); a third-party kind needs an
entry there to be servable.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from pathlib import Path

from deltaserve.server.errors import EngineBindError

BASE_STATE = "base"
"""The engine state of the untouched base model (also used by concurrent deltas)."""


class Binding(ABC):
    """One delta version attached to the engine."""

    def __init__(self, name: str, digest: str, path: Path, **context):
        self.name, self.digest, self.path = name, digest, path

    @property
    def state(self) -> str:
        """Engine state the delta's requests need (:data:`BASE_STATE` for concurrent kinds)."""
        return BASE_STATE

    def lora_request(self):
        """The ``LoRARequest`` requests of this delta carry, or None."""
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

    def __init__(self, name: str, digest: str, path: Path, **context):
        super().__init__(name, digest, path)
        from vllm.lora.request import LoRARequest

        self._request = LoRARequest(f"{name}@{digest.removeprefix('sha256:')[:12]}", next(_lora_ids), str(path))

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


BINDINGS: dict[str, type[Binding]] = {"lora": LoraBinding}


def binding_for(kind: str, name: str, digest: str, path: Path, **context) -> Binding:
    """``context``: what a binding may need besides the bundle (``exclusive=``, ``config=`` …)."""
    import deltaserve.server.exclusive  # noqa: F401  (adds the exclusive kinds to BINDINGS)

    try:
        cls = BINDINGS[kind]
    except KeyError:
        raise EngineBindError(
            f"delta kind `{kind}` cannot be served: no engine binding (servable: {sorted(BINDINGS)})"
        ) from None
    return cls(name, digest, path, **context)
