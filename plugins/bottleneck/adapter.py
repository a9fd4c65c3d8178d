"""The bottleneck adapter module and its attachment to a model by forward hooks.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP" (ICML 2019,
https://arxiv.org/abs/1902.00751) and Pfeiffer et al., "AdapterFusion"
(https://arxiv.org/abs/2005.00247): a small down/up projection added to a module's
output, ``y' = y + scaling * up(act(down(y)))``. The tuning trainer trains these
modules (attached with :func:`attach_adapters`, gradients flow through the hooks);
the `bottleneck` kind applies trained ones.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from deltaserve.plugins.kind import AppliedDelta
from deltaserve.plugins.families import family_of

if TYPE_CHECKING:
    from collections.abc import Mapping

# "gelu" is the exact (erf) GELU, as nn.GELU() defaults; engines must use the same.
ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}
TENSOR_SUFFIXES = ("down.weight", "down.bias", "up.weight", "up.bias")


class BottleneckAdapter(nn.Module):
    """``y' = y + scaling * up(act(down(y)))`` on the last dimension ``dim`` of ``y``.

    ``down``: Linear(dim → bottleneck_dim), ``up``: Linear(bottleneck_dim → dim). A fresh
    adapter has ``up`` zero, so it is the identity until trained.
    """

    def __init__(
        self, dim: int, bottleneck_dim: int, activation: str = "relu", scaling: float = 1.0, *, dtype=None, device=None
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is not one of {sorted(ACTIVATIONS)}")
        self.down = nn.Linear(dim, bottleneck_dim, dtype=dtype, device=device)  # weight [r, d]
        self.up = nn.Linear(bottleneck_dim, dim, dtype=dtype, device=device)  # weight [d, r]
        self.act = ACTIVATIONS[activation]()
        self.activation = activation
        self.scaling = float(scaling)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``down`` as nn.Linear initialises it; ``up`` zero → the identity map."""
        self.down.reset_parameters()
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, y: torch.Tensor) -> torch.Tensor:  # y: [..., d]
        return y + self.scaling * self.up(self.act(self.down(y)))

    def tensors(self, module: str) -> dict[str, torch.Tensor]:
        """Bundle tensors of this adapter for target ``module`` (checkpoint name): ``{module}.down.weight`` …"""
        return {f"{module}.{s}": t.detach().clone() for s, t in zip(TENSOR_SUFFIXES, self._params(), strict=True)}

    def load_tensors(self, module: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy ``{module}.down.weight`` … from ``tensors`` into this adapter."""
        with torch.no_grad():
            for suffix, param in zip(TENSOR_SUFFIXES, self._params(), strict=True):
                param.copy_(tensors[f"{module}.{suffix}"])

    def _params(self) -> tuple[torch.Tensor, ...]:
        return (self.down.weight, self.down.bias, self.up.weight, self.up.bias)


def attach_adapters(
    model: nn.Module, adapters: Mapping[str, BottleneckAdapter], description: str = "bottleneck"
) -> AppliedDelta:
    """Run each adapter on the output of its module (keys: checkpoint names) via forward hooks.

    The adapters are *not* registered as sub-modules, so the model's parameters and
    module tree stay as they are; ``remove()`` on the result removes the hooks.
    """
    modules, family = dict(model.named_modules()), family_of(model)
    targets = []
    for name, adapter in adapters.items():
        module = modules.get(family.to_module(name))
        if module is None:
            raise KeyError(f"model has no module `{family.to_module(name)}` (checkpoint `{name}`)")
        targets.append((module, adapter))
    handles = [module.register_forward_hook(lambda _m, _args, out, a=adapter: a(out)) for module, adapter in targets]

    def undo() -> None:
        for handle in handles:
            handle.remove()

    return AppliedDelta(model, undo, description)
