"""What a tuning method is: training hooks on the shared loop, and an exporter to a delta bundle.

A method object lives for one tuning run::

    method = get_method("spider")(scope, options)
    train_model, hooks = method.prepare(model)   # may wrap or extend the model (LoRA, adapters)
    train(train_model, processor, items, config, hooks)
    method.finalize(base_dir)                    # the model now equals base + exported delta
    method.export(out, name=..., base=..., base_dir=..., task=..., info=...)

``prepare`` freezes nothing itself: :func:`deltaserve.tuning.train.train` freezes every model
parameter that ``hooks.trainable`` does not return.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from deltaserve.tuning.methods.scope import Scope
from deltaserve.tuning.train import TrainHooks

if TYPE_CHECKING:
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.manifest import MethodInfo, TaskInfo


@dataclass(frozen=True)
class MethodOptions:
    """Method-specific hyper-parameters (each method reads only its own; all are recorded in the manifest)."""

    magnitude_ratio: float = 0.5
    """``magnitude``: fraction of each tensor, the largest |w0|, that stays frozen."""
    lora_r: int = 8
    """``lora``: rank."""
    lora_alpha: float = 16.0
    """``lora``: scaling numerator (the update is ``alpha / r · B A``)."""
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    """``lora``: linear modules (last name component) of the in-scope decoder layers that get factors."""
    bottleneck_dim: int = 32
    """``bottleneck``: width of the down projection."""
    bottleneck_activation: str = "relu"
    bottleneck_scaling: float = 1.0
    bottleneck_targets: tuple[str, ...] = ("o_proj", "down_proj")
    """``bottleneck``: adapters sit on these modules' outputs (Houlsby: after attention and after the MLP)."""

    def as_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


class TuningMethod(ABC):
    """One method, configured for one run. Subclasses set ``name``, ``kind`` and ``default_lr``."""

    name: ClassVar[str]
    kind: ClassVar[str]
    """The bundle kind :meth:`export` writes."""
    default_lr: ClassVar[float]
    """Peak learning rate used when the run does not set one."""

    def __init__(self, scope: Scope, options: MethodOptions | None = None):
        self.scope = scope
        self.options = options or MethodOptions()

    @abstractmethod
    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, TrainHooks]:
        """Set up ``model`` (a transformers LLaVA in float32) for training; returns the module to call and the hooks."""

    def finalize(self, base_dir: Path) -> None:
        """After training, before evaluation: bring the model into exactly the state the exported
        bundle reproduces when applied (see the selective methods). Default: nothing to do."""

    @abstractmethod
    def export(
        self,
        out: Path,
        *,
        name: str,
        base: BaseSpec,
        base_dir: Path,
        task: TaskInfo,
        info: MethodInfo,
        extra_files: dict[str, bytes],
    ) -> Path:
        """Write the trained delta as a bundle of :attr:`kind` (validated against ``base``) to ``out``."""

    def hyperparameters(self) -> dict:
        """The method's own hyper-parameters for the manifest (scope included)."""
        return {"scope": self.scope.as_dict()}

    def stats(self) -> dict:
        """After export: facts about the delta (``trainable_params``, ``delta_params``, ``density`` …)."""
        return {}
