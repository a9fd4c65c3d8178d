"""Write `sparse` bundles; turn a tuned state (w0 → w) into sparse differences."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.manifest import MethodInfo, TaskInfo
from deltaserve.plugins.sparse.kind import DELTA_FILE
from deltaserve.plugins.writer import write_bundle

if TYPE_CHECKING:
    import torch

    from deltaserve.plugins.base_spec import BaseSpec

SparseDeltas = dict[str, "tuple[torch.Tensor, torch.Tensor]"]  # checkpoint name → (indices [nnz] int64, values [nnz])


def sparse_from_dense(w0: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> SparseDeltas:
    """Entries where ``w`` differs from ``w0``, as (flat indices, ``w - w0``) per parameter.

    Keys are whatever names the caller uses (bundles want checkpoint names). Parameters
    without any change are left out. Values keep ``w0``'s dtype.
    """
    import torch

    deltas = {}
    for name, before in w0.items():
        after = w[name].to(before.dtype)
        changed = (after != before).reshape(-1)  # [numel]
        if not bool(changed.any()):
            continue
        indices = torch.nonzero(changed).reshape(-1).to(torch.int64)  # ascending by construction
        values = (after.reshape(-1) - before.reshape(-1))[indices]
        deltas[name] = (indices, values)
    return deltas


def write_sparse_bundle(
    out_dir: str | os.PathLike,
    *,
    name: str,
    base: BaseSpec,
    deltas: SparseDeltas,
    task: TaskInfo | None = None,
    method: MethodInfo | None = None,
    trainable_numel: int | None = None,
    extra_files: dict[str, bytes] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a `sparse` bundle for ``base`` (validated before it is published).

    ``deltas`` maps checkpoint parameter names to (flat int64 indices, values = w - w0);
    ``trainable_numel`` records how many coordinates the method could change.
    ``extra_files`` (e.g. example images) are added as they are.
    """
    unknown = sorted(set(deltas) - set(base.params))
    if unknown:
        raise BundleError(out_dir, [f"parameter `{p}` does not exist in the base" for p in unknown])
    tensors, params = {}, {}
    for param, (indices, values) in sorted(deltas.items()):
        tensors[f"{param}.indices"] = indices
        tensors[f"{param}.values"] = values
        params[param] = {"shape": list(base.params[param][0]), "nnz": int(indices.numel())}
    numel = sum(math.prod(p["shape"]) for p in params.values())
    config = {
        "params": params,
        "density": sum(p["nnz"] for p in params.values()) / max(1, numel),
        "trainable_numel": trainable_numel,
    }
    return write_bundle(
        out_dir,
        name=name,
        kind="sparse",
        base=base,
        config=config,
        files={DELTA_FILE: tensors, **(extra_files or {})},
        task=task,
        method=method,
        overwrite=overwrite,
    )
