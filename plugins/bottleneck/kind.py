"""The `bottleneck` kind: additive adapters on the output of linear modules.

Bundle layout: ``adapter.safetensors`` holding, for each target module ``M``
(checkpoint name of a linear module of the language model, d = its out_features):
``M.down.weight`` [r, d], ``M.down.bias`` [r], ``M.up.weight`` [d, r], ``M.up.bias`` [d].
``config``: ``{"modules": [M, ...], "bottleneck_dim": r, "activation": "relu"|"gelu"|"silu"|"tanh",
"scaling": float, "placement": "output"}``; semantics in
:class:`~deltaserve.plugins.bottleneck.adapter.BottleneckAdapter`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaserve.plugins.families import FAMILIES
from deltaserve.plugins.bottleneck.adapter import ACTIVATIONS, TENSOR_SUFFIXES, BottleneckAdapter, attach_adapters
from deltaserve.plugins.kind import AppliedDelta, DeltaKind
from deltaserve.plugins.kind_checks import (
    dtype_name,
    is_int,
    is_number,
    required_tensors,
    tensor_set_problems,
    unexpected_fields,
)

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import Bundle
    from deltaserve.plugins.serving import ServingPlan

ADAPTER_FILE = "adapter.safetensors"
PLACEMENTS = ("output",)  # sequential adapter on the module output; other placements are future work


def _valid_modules(modules: object) -> bool:
    return (
        isinstance(modules, list)
        and bool(modules)
        and all(isinstance(m, str) for m in modules)
        and len(set(modules)) == len(modules)
    )


def config_problems(config: dict) -> list[str]:
    problems = unexpected_fields(config, ("modules", "bottleneck_dim", "activation", "scaling", "placement"), "config")
    if not _valid_modules(config.get("modules")):
        problems.append("`config.modules` must be a non-empty list of distinct module names")
    if not is_int(config.get("bottleneck_dim"), minimum=1):
        problems.append("`config.bottleneck_dim` must be a positive integer")
    if config.get("activation") not in ACTIVATIONS:
        problems.append(f"`config.activation` must be one of {', '.join(ACTIVATIONS)}")
    if not is_number(config.get("scaling")):
        problems.append("`config.scaling` must be a finite number")
    if config.get("placement") not in PLACEMENTS:
        problems.append(f"`config.placement` must be one of {', '.join(PLACEMENTS)}")
    return problems


def _module_problems(
    module: str, tensors: dict[str, torch.Tensor], r: int, base: BaseSpec | None, shapes: dict
) -> list[str]:
    problems = []
    prefixes = (base.family.language_model,) if base is not None else tuple(f.language_model for f in FAMILIES)
    if not module.startswith(prefixes):
        problems.append(f"module `{module}` is outside the language model (`{prefixes[0]}…`)")
    if base is not None and module not in shapes:
        problems.append(f"module `{module}` is not a linear module of the base")
    up_bias = tensors.get(f"{module}.up.bias")
    d = (
        shapes[module][0]
        if module in shapes
        else (up_bias.shape[0] if up_bias is not None and up_bias.dim() == 1 else None)
    )
    expected_dtype = base.param_dtype(f"{module}.weight") if base is not None else None
    for suffix, shape in zip(TENSOR_SUFFIXES, ([r, d], [r], [d, r], [d]), strict=True):
        tensor = tensors.get(f"{module}.{suffix}")
        if tensor is None:
            continue
        if d is not None and list(tensor.shape) != shape:
            problems.append(f"`{module}.{suffix}` has shape {list(tensor.shape)}, expected {shape}")
        if expected_dtype is not None and dtype_name(tensor) != expected_dtype:
            problems.append(f"`{module}.{suffix}` has dtype {dtype_name(tensor)}, the base module is {expected_dtype}")
        elif not tensor.is_floating_point():
            problems.append(f"`{module}.{suffix}` must be floating point, got {dtype_name(tensor)}")
    return problems


class BottleneckKind(DeltaKind):
    """Bottleneck adapters on module outputs (forward hooks here; output maps when served)."""

    name = "bottleneck"

    def validate(self, bundle: Bundle, base: BaseSpec | None) -> list[str]:
        config = bundle.manifest.config
        problems = config_problems(config)
        tensors = required_tensors(bundle, ADAPTER_FILE, problems)
        modules, rank = config.get("modules"), config.get("bottleneck_dim")
        if tensors is None or not _valid_modules(modules) or not is_int(rank, minimum=1):
            return problems  # without the module list and rank there is nothing to compare tensors with
        problems += tensor_set_problems(
            ADAPTER_FILE, set(tensors), {f"{m}.{s}" for m in modules for s in TENSOR_SUFFIXES}
        )
        shapes = base.module_shapes() if base is not None else {}
        for module in modules:
            problems += _module_problems(module, tensors, rank, base, shapes)
        return problems

    def apply(self, model: torch.nn.Module, bundle: Bundle) -> AppliedDelta:
        device = next(model.parameters()).device
        adapters = _adapters(bundle.manifest.config, bundle.load_tensors(ADAPTER_FILE), device)
        return attach_adapters(model, adapters, f"bottleneck:{bundle.manifest.name}")

    def serving_plan(self, bundle_dir: Path, config: dict) -> ServingPlan:
        from safetensors.torch import load_file

        from deltaserve.plugins.serving import ServingPlan

        return ServingPlan(outputs=_adapters(config, load_file(str(bundle_dir / ADAPTER_FILE))))


def _adapters(config: dict, tensors: dict, device=None) -> dict[str, BottleneckAdapter]:
    """Module (checkpoint name) → its trained adapter, frozen."""
    adapters = {}
    for module in config["modules"]:
        up_bias = tensors[f"{module}.up.bias"]  # [d]
        adapter = BottleneckAdapter(
            up_bias.shape[0],
            config["bottleneck_dim"],
            config["activation"],
            config["scaling"],
            dtype=up_bias.dtype,
            device=device,
        )
        adapter.load_tensors(module, tensors)
        adapters[module] = adapter.eval().requires_grad_(False)
    return adapters
