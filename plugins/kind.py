"""The abstract delta kind: validate a bundle, apply it to / remove it from a PyTorch model.

Third-party kinds subclass :class:`DeltaKind` and declare it in the entry-point group
``deltaserve.plugins`` (see :mod:`deltaserve.plugins.registry`); the built-in kinds
register the same way.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import Bundle
    from deltaserve.plugins.serving import ServingPlan

ENGINES = ("plan", "vllm_lora")
"""How the serving engine applies a kind: through its :meth:`DeltaKind.serving_plan` (deltaserve's
per-token machinery), or as a PEFT LoRA directory loaded by vLLM's own multi-LoRA."""


class AppliedDelta:
    """Handle of a delta applied to a model; ``remove()`` (or leaving the ``with`` block) undoes it.

    After ``remove()`` every parameter of the model is bit-identical to before ``apply``
    and the module tree (names, types, hooks) is as before. ``remove()`` is idempotent.
    """

    def __init__(self, model: torch.nn.Module, undo: Callable[[], None], description: str = ""):
        self.model = model
        self.description = description
        self._undo: Callable[[], None] | None = undo

    @property
    def active(self) -> bool:
        """True until :meth:`remove` has run."""
        return self._undo is not None

    def remove(self) -> None:
        undo, self._undo = self._undo, None
        if undo is not None:
            undo()

    def __enter__(self) -> AppliedDelta:
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()

    def __repr__(self) -> str:
        return f"AppliedDelta({self.description!r}, active={self.active})"


class DeltaKind(ABC):
    """One kind of delta (``lora``, ``sparse``, ``bottleneck``, or a third-party one).

    Contract:

    - ``name``: registry name, ``[a-z][a-z0-9_]{0,31}``; bundles name it in ``delta.json`` ``kind``.
    - ``engine``: how the serving engine applies it — ``"plan"`` (default: the kind's
      :meth:`serving_plan`, served in the shared batch or, by policy, as an exclusive
      engine state) or ``"vllm_lora"`` (the bundle holds a PEFT LoRA directory that
      vLLM's multi-LoRA loads; :meth:`lora_dir` names it).
    - Kinds are stateless and constructed without arguments.
    - :meth:`validate` returns kind-specific problems; the bundle reader has already
      checked everything generic (manifest schema, file list, hashes, safetensors
      headers, finite values, base fingerprint). It must never execute bundle content.
    - :meth:`apply` is the reference implementation: exact, in place, undone bit-for-bit
      by the returned handle.
    """

    name: ClassVar[str]
    engine: ClassVar[str] = "plan"

    @abstractmethod
    def validate(self, bundle: Bundle, base: BaseSpec | None) -> list[str]:
        """Kind-specific problems of ``bundle`` (expected tensors present, no extra ones, shapes and
        dtypes against ``base`` when given, index ranges, ``config`` fields). Empty list: valid."""

    @abstractmethod
    def apply(self, model: torch.nn.Module, bundle: Bundle) -> AppliedDelta:
        """Apply the (validated) delta to a transformers model of the base's family in place."""

    def serving_plan(self, bundle_dir: Path, config: dict) -> ServingPlan:
        """What the serving engine computes for a (validated, stored) bundle of this kind; see
        :mod:`deltaserve.plugins.serving`. Runs in vLLM's worker process."""
        raise NotImplementedError(f"kind `{self.name}` declares no serving plan")

    def recognises(self, directory: Path) -> bool:
        """True when ``directory`` — not a deltaserve bundle — is another tool's output this kind imports
        (the ``lora`` kind: a plain PEFT adapter directory). ``deltaserve register`` accepts such directories."""
        return False

    def import_directory(self, src: Path, out: Path, *, name: str, base: BaseSpec) -> Path:
        """Write a bundle of this kind at ``out`` from a directory :meth:`recognises` accepted."""
        raise NotImplementedError(f"kind `{self.name}` imports no foreign directory")

    def lora_dir(self, bundle_dir: Path) -> Path:
        """``engine == "vllm_lora"`` kinds: the PEFT adapter directory vLLM loads."""
        raise NotImplementedError(f"kind `{self.name}` is not served by vLLM's LoRA")
