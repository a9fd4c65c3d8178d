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
    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import Bundle

BINDINGS = ("concurrent", "exclusive")


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
    - ``binding``: how the serving engine binds it — ``"concurrent"`` (rides in the same
      batch as base traffic, like vLLM multi-LoRA) or ``"exclusive"`` (the engine must
      switch into the delta's state and back).
    - Kinds are stateless and constructed without arguments.
    - :meth:`validate` returns kind-specific problems; the bundle reader has already
      checked everything generic (manifest schema, file list, hashes, safetensors
      headers, finite values, base fingerprint). It must never execute bundle content.
    - :meth:`apply` is the reference implementation: exact, in place, undone bit-for-bit
      by the returned handle.
    """

    name: ClassVar[str]
    binding: ClassVar[str]

    @abstractmethod
    def validate(self, bundle: Bundle, base: BaseSpec | None) -> list[str]:
        """Kind-specific problems of ``bundle`` (expected tensors present, no extra ones, shapes and
        dtypes against ``base`` when given, index ranges, ``config`` fields). Empty list: valid."""

    @abstractmethod
    def apply(self, model: torch.nn.Module, bundle: Bundle) -> AppliedDelta:
        """Apply the (validated) delta to a transformers ``LlavaForConditionalGeneration`` in place."""
