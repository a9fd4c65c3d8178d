"""Checks shared by the built-in kinds' ``validate`` (tensor sets, dtypes, config fields)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from deltaserve.plugins.dtypes import safetensors_dtype

if TYPE_CHECKING:
    import torch

    from deltaserve.plugins.bundle import Bundle


def required_file(bundle: Bundle, rel: str, problems: list[str]) -> bool:
    """True when the kind can read ``rel``. A missing file is a problem; a file the generic
    checks rejected was reported already, so it only returns False."""
    if not bundle.has_file(rel):
        problems.append(f"missing file `{rel}`")
    return bundle.usable(rel)


def required_tensors(bundle: Bundle, rel: str, problems: list[str]) -> dict[str, torch.Tensor] | None:
    """The tensors of ``rel``, or None when :func:`required_file` says it cannot be read."""
    return bundle.load_tensors(rel) if required_file(bundle, rel, problems) else None


def tensor_set_problems(rel: str, present: set[str], expected: set[str]) -> list[str]:
    """One problem per missing and per unexpected tensor name."""
    return [f"missing tensor `{n}` in `{rel}`" for n in sorted(expected - present)] + [
        f"unexpected tensor `{n}` in `{rel}`" for n in sorted(present - expected)
    ]


def dtype_name(tensor: torch.Tensor) -> str:
    """safetensors name of the tensor's dtype (``"F32"``)."""
    return safetensors_dtype(tensor.dtype)


def unexpected_fields(obj: dict, allowed: tuple[str, ...], where: str) -> list[str]:
    return [f"unexpected field `{where}.{k}`" for k in sorted(set(obj) - set(allowed))]


def is_int(value: object, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
