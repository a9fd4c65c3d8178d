"""The tuning methods: selective (``spider``, ``magnitude``, ``full``), additive (``bottleneck``),
reparameterised (``lora``). One module per method; :data:`METHODS` maps names to classes."""

from __future__ import annotations

from deltaserve.tuning.methods.base import MethodOptions, TuningMethod
from deltaserve.tuning.methods.bottleneck import BottleneckMethod
from deltaserve.tuning.methods.full import FullMethod
from deltaserve.tuning.methods.lora import LoraMethod
from deltaserve.tuning.methods.magnitude import MagnitudeMethod
from deltaserve.tuning.methods.scope import Scope
from deltaserve.tuning.methods.spider import SpiderMethod

METHODS: dict[str, type[TuningMethod]] = {
    m.name: m for m in (SpiderMethod, MagnitudeMethod, FullMethod, LoraMethod, BottleneckMethod)
}


def get_method(name: str) -> type[TuningMethod]:
    """The method class called ``name``; raises ValueError naming the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(
            f"unknown tuning method `{name}`; known methods: {', '.join(f'`{m}`' for m in METHODS)}"
        ) from None


__all__ = ["METHODS", "MethodOptions", "Scope", "TuningMethod", "get_method"]
