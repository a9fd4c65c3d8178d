"""Write `sparse` bundles; turn a tuned state (w0 → w) into sparse differences."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import TYPE_CHECKING

from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.manifest import MethodInfo, TaskInfo
from deltaserve.plugins.sparse.encoding import index_problems, smallest
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
    """Write a `sparse` bundle (format 2) for ``base`` (validated before it is published).

    ``deltas`` maps checkpoint parameter names to (flat indices, strictly increasing; values = w - w0);
    each parameter is stored in the encoding of the fewest bytes
    (:mod:`deltaserve.plugins.sparse.encoding`). ``trainable_numel`` records how many coordinates
    the method could change. ``extra_files`` (e.g. example images) are added as they are.
    """
    import torch

    problems = [f"parameter `{p}` does not exist in the base" for p in sorted(set(deltas) - set(base.params))]
    for param, (indices, values) in sorted(deltas.items()):
        if indices.dim() != 1 or values.shape != indices.shape:
            problems.append(f"`{param}`: indices and values must be 1-D tensors of the same length")
        elif param in base.params:  # the compact encodings hold each position once, in order
            problems += index_problems(f"{param}.indices", indices, math.prod(base.params[param][0]))
    if problems:
        raise BundleError(out_dir, problems)
    tensors, params = {}, {}
    for param, (indices, values) in sorted(deltas.items()):
        shape = list(base.params[param][0])
        encoding, parts = smallest(indices.detach().cpu().to(torch.int64), values.detach().cpu(), shape)
        tensors |= {f"{param}.{part}": tensor for part, tensor in parts.items()}
        params[param] = {"shape": shape, "nnz": int(indices.numel()), "encoding": encoding}
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
        format_version=2,
    )
