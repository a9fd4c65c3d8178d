"""The `sparse` kind: selective tuning (SPIDER, magnitude masks, full FT as the dense limit).

Bundle layout: ``delta.safetensors`` holding, for every changed base parameter ``P``
(checkpoint name), ``P.indices`` (int64, flat row-major positions, strictly
increasing) and ``P.values`` (differences ``w - w0``, in the base parameter's dtype).
``config``: ``{"params": {P: {"shape": [...], "nnz": n}}, "density": float,
"trainable_numel": int | null}`` where density = Σ nnz / Σ numel of the touched params.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from deltaserve.plugins.kind import AppliedDelta, DeltaKind
from deltaserve.plugins.kind_checks import (
    dtype_name,
    is_int,
    is_number,
    required_tensors,
    tensor_set_problems,
    unexpected_fields,
)
from deltaserve.plugins.naming import checkpoint_to_module

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import Bundle
    from deltaserve.plugins.serving import ServingPlan

DELTA_FILE = "delta.safetensors"


def _config_problems(config: dict) -> tuple[dict[str, tuple[tuple[int, ...], int]], list[str]]:
    """Parse ``config``: (param → (shape, nnz), problems)."""
    problems = unexpected_fields(config, ("params", "density", "trainable_numel"), "config")
    params = config.get("params")
    if not isinstance(params, dict) or not params:
        return {}, problems + ["`config.params` must be a non-empty object"]
    parsed = {}
    for name, entry in params.items():
        shape = entry.get("shape") if isinstance(entry, dict) else None
        nnz = entry.get("nnz") if isinstance(entry, dict) else None
        if not (isinstance(shape, list) and all(is_int(d) for d in shape) and is_int(nnz)):
            problems.append(f'`config.params.{name}` must be {{"shape": [int, ...], "nnz": int}}')
            continue
        parsed[name] = (tuple(shape), nnz)
    density = config.get("density")
    if not is_number(density) or not 0 <= density <= 1:
        problems.append("`config.density` must be a number in [0, 1]")
    elif parsed and len(parsed) == len(params):
        actual = sum(n for _, n in parsed.values()) / max(1, sum(math.prod(s) for s, _ in parsed.values()))
        if not math.isclose(density, actual, rel_tol=1e-6, abs_tol=1e-12):
            problems.append(f"`config.density` is {density}, the params give {actual}")
    if config.get("trainable_numel") is not None and not is_int(config["trainable_numel"]):
        problems.append("`config.trainable_numel` must be a non-negative integer or null")
    return parsed, problems


def _index_problems(name: str, indices: torch.Tensor, numel: int) -> list[str]:
    if indices.numel() == 0:
        return []
    problems = []
    if int(indices.min()) < 0 or int(indices.max()) >= numel:
        problems.append(f"index out of range in `{name}.indices`: indices must lie in [0, {numel})")
    steps = indices[1:] - indices[:-1]
    if bool((steps == 0).any()):
        problems.append(f"duplicate index in `{name}.indices`")
    if bool((steps < 0).any()):
        problems.append(f"unsorted indices in `{name}.indices` (must be strictly increasing)")
    return problems


def add_at(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``w0 + Δ``: a copy of ``base`` with ``values`` added at the flat ``indices`` (the kind's arithmetic,
    in the base's dtype, as :meth:`SparseKind.apply` computes it in place). The serving plan's tensor update."""
    out = base.clone()
    flat = out.view(-1)
    flat[indices] = flat[indices] + values.to(dtype=base.dtype, device=base.device)
    return out


class SparseKind(DeltaKind):
    """Sparse additive differences on existing base parameters (served as updated tensors)."""

    name = "sparse"

    def validate(self, bundle: Bundle, base: BaseSpec | None) -> list[str]:
        import torch

        params, problems = _config_problems(bundle.manifest.config)
        tensors = required_tensors(bundle, DELTA_FILE, problems)
        if tensors is None or not params:
            return problems
        expected = {f"{p}.{part}" for p in params for part in ("indices", "values")}
        problems += tensor_set_problems(DELTA_FILE, set(tensors), expected)
        for name, (shape, nnz) in params.items():
            if base is not None:
                if name not in base.params:
                    problems.append(f"parameter `{name}` does not exist in the base")
                elif base.params[name][0] != shape:
                    problems.append(
                        f"`config.params.{name}.shape` is {list(shape)}, the base parameter is {list(base.params[name][0])}"
                    )
            indices, values = tensors.get(f"{name}.indices"), tensors.get(f"{name}.values")
            if indices is None or values is None:
                continue
            if indices.dtype != torch.int64 or indices.dim() != 1:
                problems.append(
                    f"`{name}.indices` must be a 1-D int64 tensor, got {dtype_name(indices)} {list(indices.shape)}"
                )
                continue
            if values.dim() != 1 or values.numel() != indices.numel():
                problems.append(
                    f"`{name}.values` must be 1-D with as many entries as `{name}.indices` ({indices.numel()})"
                )
            if indices.numel() != nnz:
                problems.append(f"`config.params.{name}.nnz` is {nnz}, `{name}.indices` has {indices.numel()} entries")
            base_dtype = base.param_dtype(name) if base is not None else None
            if base_dtype is not None and dtype_name(values) != base_dtype:
                problems.append(f"`{name}.values` has dtype {dtype_name(values)}, the base parameter is {base_dtype}")
            elif not values.is_floating_point():
                problems.append(f"`{name}.values` must be floating point, got {dtype_name(values)}")
            problems += _index_problems(name, indices, math.prod(shape))
        return problems

    def apply(self, model: torch.nn.Module, bundle: Bundle) -> AppliedDelta:
        import torch

        tensors = bundle.load_tensors(DELTA_FILE)
        named = dict(model.named_parameters())
        targets = []  # resolve everything first: a missing parameter must not leave a half-applied model
        for name in bundle.manifest.config["params"]:
            param = named.get(checkpoint_to_module(name))
            if param is None:
                raise KeyError(f"model has no parameter `{checkpoint_to_module(name)}` (checkpoint `{name}`)")
            if not param.is_contiguous():
                raise ValueError(f"parameter `{name}` is not contiguous; cannot patch it through a flat view")
            targets.append((param, tensors[f"{name}.indices"], tensors[f"{name}.values"]))
        saved = []  # (flat view [numel], indices [nnz], original values [nnz])
        with torch.no_grad():
            for param, indices, values in targets:
                flat = param.data.view(-1)
                idx = indices.to(param.device)
                original = flat[idx].clone()
                flat[idx] = original + values.to(device=param.device, dtype=param.dtype)  # w0 + (w - w0)
                saved.append((flat, idx, original))

        def undo() -> None:
            with torch.no_grad():
                for flat, idx, original in reversed(saved):
                    flat[idx] = original  # the saved bits, not w - (w - w0): exact by construction

        return AppliedDelta(model, undo, f"sparse:{bundle.manifest.name}")

    def serving_plan(self, bundle_dir: Path, config: dict) -> ServingPlan:
        from functools import partial

        from safetensors.torch import load_file

        from deltaserve.plugins.serving import ServingPlan

        tensors = load_file(str(bundle_dir / DELTA_FILE))
        return ServingPlan(
            tensors={
                name: partial(add_at, indices=tensors[f"{name}.indices"], values=tensors[f"{name}.values"])
                for name in config["params"]
            }
        )
