"""Selective tuning (spider, magnitude, full): the scope's own weights change; the delta is ``w - w0``.

The exported `sparse` bundle holds every coordinate where the tuned weight differs from the
base weight *as stored in the base directory* (read back from its safetensors files, so
the delta is relative to exactly the bits the server loads), with the density in the manifest.
"""

from __future__ import annotations

from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltaserve.plugins.families import family_of
from deltaserve.tuning.methods.base import TuningMethod
from deltaserve.tuning.methods.scope import NamedParams
from deltaserve.tuning.train import TrainHooks

if TYPE_CHECKING:
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.manifest import MethodInfo, TaskInfo


class NothingToExport(ValueError):
    """Tuning left every weight equal to the base: there is no delta to write."""


class ScopeHooks(TrainHooks):
    """Plain dense fine-tuning of a fixed parameter list (the ``full`` method; base of the others)."""

    def __init__(self, params: NamedParams):
        self.params = params

    def trainable(self, model: torch.nn.Module) -> NamedParams:
        return self.params


def base_tensors(base_dir: Path, names: list[str]) -> dict[str, torch.Tensor]:
    """The named checkpoint tensors of a base directory, read from its safetensors files."""
    from safetensors import safe_open

    wanted, found = set(names), {}
    for file in sorted(Path(base_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for key in wanted & set(f.keys()):
                found[key] = f.get_tensor(key)
    missing = wanted - set(found)
    if missing:
        raise KeyError(f"{base_dir}: the base has no tensor {', '.join(f'`{m}`' for m in sorted(missing))}")
    return found


class SelectiveMethod(TuningMethod):
    """Shared prepare/export of the methods that train the scope's parameters in place."""

    kind = "sparse"
    default_lr = 3e-3

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, TrainHooks]:
        self._params = self.scope.parameters(model)
        self._family = family_of(model)
        return model, self.make_hooks(self._params)

    @abstractmethod
    def make_hooks(self, params: NamedParams) -> TrainHooks:
        """The method's hooks for the scope's parameters."""

    def finalize(self, base_dir: Path) -> None:
        """Compute the delta ``w - w0`` against the base file and set every weight to ``w0 + (w - w0)``.

        In float32, ``w0 + (w - w0)`` can differ from ``w`` in the last bit (when the difference
        is not exact). The sparse kind applies exactly ``w0 + values``, so the tuned model is
        snapped to that: the evaluated model *is* the served one, bit for bit.
        """
        from deltaserve.plugins.sparse import sparse_from_dense

        tuned = {self._family.to_checkpoint(n): p for n, p in self._params}
        w0 = base_tensors(base_dir, list(tuned))
        self._deltas = sparse_from_dense(w0, {k: p.detach() for k, p in tuned.items()})
        with torch.no_grad():
            for key, (indices, values) in self._deltas.items():
                flat = tuned[key].view(-1)  # [numel], a view of the parameter
                flat[indices] = w0[key].reshape(-1)[indices].to(flat.dtype) + values.to(flat.dtype)
        trainable = sum(p.numel() for _, p in self._params)
        nnz = sum(int(indices.numel()) for indices, _ in self._deltas.values())
        self._stats = {"trainable_params": trainable, "delta_params": nnz, "density": nnz / trainable}

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
        from deltaserve.plugins.sparse import write_sparse_bundle

        if not self._deltas:
            raise NothingToExport(
                "tuning changed no weight of the base: nothing to export (more steps or a higher learning rate?)"
            )
        trainable = self._stats["trainable_params"]
        return write_sparse_bundle(
            out,
            name=name,
            base=base,
            deltas=self._deltas,
            task=task,
            method=info,
            trainable_numel=trainable,
            extra_files=extra_files,
        )

    def stats(self) -> dict:
        return dict(getattr(self, "_stats", {}))
