"""The `sparse` kind: selective tuning (SPIDER, magnitude masks, full FT as the dense limit).

Bundle layout: ``delta.safetensors`` holding, for every changed base parameter ``P``
(checkpoint name), its changed entries (flat row-major positions) and differences
``w - w0`` (in the base parameter's dtype) in one of the encodings of
:mod:`deltaserve.plugins.sparse.encoding` (format 1: ``P.indices`` int64 + ``P.values``).
``config``: ``{"params": {P: {"shape": [...], "nnz": n, "encoding": e}}, "density": float,
"trainable_numel": int | null}`` where density = Σ nnz / Σ numel of the touched params;
``encoding`` is present in format 2 and absent in format 1.
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
from deltaserve.plugins.families import family_of
from deltaserve.plugins.sparse.encoding import (
    ENCODINGS,
    LEGACY,
    PARTS,
    counted,
    decode,
    index_problems,
    layout_problems,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import Bundle
    from deltaserve.plugins.serving import ServingPlan

DELTA_FILE = "delta.safetensors"


def _entry_problems(name: str, entry: object, format_version: int) -> tuple[bool, list[str]]:
    """(usable, problems) of one ``config.params`` entry (format 1: shape and nnz; format 2: and an encoding)."""
    fields = ("shape", "nnz") if format_version == 1 else ("shape", "nnz", "encoding")
    shape = entry.get("shape") if isinstance(entry, dict) else None
    if not (isinstance(shape, list) and all(is_int(d) for d in shape) and is_int(entry.get("nnz"))):
        wanted = '{"shape": [int, ...], "nnz": int' + (', "encoding": str}' if format_version > 1 else "}")
        return False, [f"`config.params.{name}` must be {wanted}"]
    if format_version == 1 and "encoding" in entry:
        return False, [f"`config.params.{name}.encoding` needs `format_version` 2 (format 1 stores int64 indices only)"]
    if format_version > 1 and entry.get("encoding") not in ENCODINGS:
        known = ", ".join(f"`{e}`" for e in sorted(ENCODINGS))
        return False, [f"`config.params.{name}.encoding` must be one of {known}, got {entry.get('encoding')!r}"]
    return True, unexpected_fields(entry, fields, f"config.params.{name}")


def _config_problems(config: dict, format_version: int) -> tuple[dict[str, dict], list[str]]:
    """Parse ``config``: (param → its entry, with ``encoding`` filled in for format 1; problems).
    Unusable entries are left out."""
    problems = unexpected_fields(config, ("params", "density", "trainable_numel"), "config")
    params = config.get("params")
    if not isinstance(params, dict) or not params:
        return {}, problems + ["`config.params` must be a non-empty object"]
    parsed = {}
    for name, entry in params.items():
        usable, bad = _entry_problems(name, entry, format_version)
        problems += bad
        if usable:
            parsed[name] = {"encoding": LEGACY, **entry}
    density = config.get("density")
    if not is_number(density) or not 0 <= density <= 1:
        problems.append("`config.density` must be a number in [0, 1]")
    elif parsed and len(parsed) == len(params):
        numel = sum(math.prod(e["shape"]) for e in parsed.values())
        actual = sum(e["nnz"] for e in parsed.values()) / max(1, numel)
        if not math.isclose(density, actual, rel_tol=1e-6, abs_tol=1e-12):
            problems.append(f"`config.density` is {density}, the params give {actual}")
    if config.get("trainable_numel") is not None and not is_int(config["trainable_numel"]):
        problems.append("`config.trainable_numel` must be a non-negative integer or null")
    return parsed, problems


def _param_problems(tensors: dict[str, torch.Tensor], name: str, spec: dict, base_dtype: str | None) -> list[str]:
    """One parameter's tensors against its entry: layout, then the decoded positions and values."""
    encoding, shape, nnz = spec["encoding"], tuple(spec["shape"]), spec["nnz"]
    problems = layout_problems(tensors, name, encoding, shape)
    if problems:
        return problems
    indices, values = decode(tensors, name, spec)
    if indices.numel() != nnz:
        problems.append(f"`config.params.{name}.nnz` is {nnz}, {counted(name, encoding, indices.numel())}")
    if values.numel() != indices.numel():
        problems.append(f"`{name}.values` has {values.numel()} entries, {counted(name, encoding, indices.numel())}")
    if base_dtype is not None and dtype_name(values) != base_dtype:
        problems.append(f"`{name}.values` has dtype {dtype_name(values)}, the base parameter is {base_dtype}")
    elif not values.is_floating_point():
        problems.append(f"`{name}.values` must be floating point, got {dtype_name(values)}")
    return problems + index_problems(f"{name}.{PARTS[encoding][0]}", indices, math.prod(shape))


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
        params, problems = _config_problems(bundle.manifest.config, bundle.manifest.format_version)
        tensors = required_tensors(bundle, DELTA_FILE, problems)
        if tensors is None or not params:
            return problems
        expected = {f"{p}.{part}" for p, spec in params.items() for part in PARTS[spec["encoding"]]}
        unusable = set(bundle.manifest.config["params"]) - set(params)  # reported: their tensors are no news
        present = {t for t in tensors if t.rpartition(".")[0] not in unusable}
        problems += tensor_set_problems(DELTA_FILE, present, expected)
        for name, spec in params.items():
            if base is not None:
                if name not in base.params:
                    problems.append(f"parameter `{name}` does not exist in the base")
                elif base.params[name][0] != tuple(spec["shape"]):
                    problems.append(
                        f"`config.params.{name}.shape` is {spec['shape']}, the base parameter is {list(base.params[name][0])}"
                    )
            if all(f"{name}.{part}" in tensors for part in PARTS[spec["encoding"]]):
                base_dtype = base.param_dtype(name) if base is not None else None
                problems += _param_problems(tensors, name, spec, base_dtype)
        return problems

    def apply(self, model: torch.nn.Module, bundle: Bundle) -> AppliedDelta:
        import torch

        tensors = bundle.load_tensors(DELTA_FILE)
        named, family = dict(model.named_parameters()), family_of(model)
        targets = []  # resolve everything first: a missing parameter must not leave a half-applied model
        for name, spec in bundle.manifest.config["params"].items():
            param = named.get(family.to_module(name))
            if param is None:
                raise KeyError(f"model has no parameter `{family.to_module(name)}` (checkpoint `{name}`)")
            if not param.is_contiguous():
                raise ValueError(f"parameter `{name}` is not contiguous; cannot patch it through a flat view")
            targets.append((param, *decode(tensors, name, spec)))
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
        plan = {}
        for name, spec in config["params"].items():
            indices, values = decode(tensors, name, spec)
            plan[name] = partial(add_at, indices=indices, values=values)
        return ServingPlan(tensors=plan)
