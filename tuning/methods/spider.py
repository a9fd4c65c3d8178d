"""``spider``: importance-aware weight allocation (SPIDER).

Huang et al., "Learn from Downstream and Be Yourself in Multimodal Large Language Model
Fine-Tuning", ICML 2025 (https://openreview.net/forum?id=FKqmIAnkrb, code:
https://github.com/WenkeHuang/SPIDER). The paper text was not reachable; this follows the
authors' trainer (``Code/train/SPIDER.py``), as pinned in DESIGN.md §Tuning::

    N(x)  = sigmoid((|x| - mean|x|) / std|x|)          per whole tensor
    start:  w0 = copy(w);  Ipre = N(w0)                 pre-trained importance
    after every optimizer.step() gave w~:
        G   += grad                                     signed running sum, no decay
        Ift  = N(G)                                     fine-tuning importance
        m    = where(Ipre < Ift, Ift / (Ipre + Ift), 0)
        m    = min(m / mean(m[m > 0]), 1)
        w    = w0 * (1 - m) + w~ * m                    unselected coordinates return to w0

Details that follow the reference code exactly:

- ``grad`` is the gradient the optimizer just used (after global-norm clipping);
- ``std`` is torch's default, unbiased (Bessel-corrected) standard deviation;
- an all-zero tensor has importance 0 everywhere; a tensor whose ``|x|`` is constant but
  not zero has no z-score (0/0 = NaN), so nothing in it is ever selected (every
  comparison with NaN is false) — e.g. the all-ones norm weights of a random-init model;
- when no coordinate of a tensor is selected, ``m`` stays 0 and the tensor returns to w0.

There is no mask-ratio hyper-parameter: the density of the delta is data-dependent.

Memory: the reference keeps several full fp32 copies under DeepSpeed. Here the extra state
is ``w0``, ``Ipre`` and ``G`` in fp32 — **12 B per trainable parameter** — on top of AdamW's
two moments (8 B/param) and the gradient (4 B/param) that plain fine-tuning has too. ``Ift``
and ``m`` are temporaries of one tensor at a time (never the whole model).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from deltaserve.tuning.methods.scope import NamedParams
from deltaserve.tuning.methods.selective import ScopeHooks, SelectiveMethod
from deltaserve.tuning.train import TrainHooks

EXTRA_STATE_BYTES_PER_PARAM = 12
"""w0 + Ipre + G, each fp32."""


def importance(x: torch.Tensor) -> torch.Tensor:
    """``N(x) = sigmoid((|x| - mean|x|) / std|x|)`` over the whole tensor (see the module docstring for the edge cases)."""
    a = x.abs()
    if not bool(a.any()):
        return torch.zeros_like(a)
    return torch.sigmoid((a - a.mean()) / a.std())


def allocation(ipre: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The allocation ``m`` ∈ [0, 1] from pre-trained importance ``ipre`` and the gradient sum ``g``."""
    ift = importance(g)
    m = torch.where(ipre < ift, ift / (ipre + ift), torch.zeros((), dtype=ift.dtype, device=ift.device))
    selected = m > 0
    if bool(selected.any()):
        m = torch.clamp(m / m[selected].mean(), max=1.0)
    return m


def combine(w0: torch.Tensor, w_tilde: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``w0 * (1 - m) + w~ * m``: where ``m`` is 0 this is ``w0`` bit for bit."""
    return w0 * (1 - m) + w_tilde * m


@dataclass
class SpiderState:
    """Per-tensor state (fp32, the parameter's shape)."""

    w0: torch.Tensor
    ipre: torch.Tensor
    g: torch.Tensor


class SpiderHooks(ScopeHooks):
    """SPIDER as hooks of the shared training loop: state at ``on_start``, allocation in ``after_step``."""

    def __init__(self, params: NamedParams):
        super().__init__(params)
        self.state: dict[str, SpiderState] = {}
        self.selected: dict[str, int] = {}
        """Coordinates with ``m > 0`` at the last step, per tensor (for reporting)."""

    def on_start(self, model, params) -> None:
        for name, p in params:
            w0 = p.detach().clone().float()
            self.state[name] = SpiderState(w0=w0, ipre=importance(w0), g=torch.zeros_like(w0))

    @torch.no_grad()
    def after_step(self, step, model, params) -> None:
        for name, p in params:
            s = self.state[name]
            if p.grad is not None:  # an unused parameter has no gradient: G unchanged
                s.g += p.grad
            m = allocation(s.ipre, s.g)
            p.copy_(combine(s.w0, p, m))
            self.selected[name] = int((m > 0).sum())

    def on_end(self, model, params) -> None:
        self.state.clear()  # 12 B/param freed: the delta is exported against the base file


class SpiderMethod(SelectiveMethod):
    name = "spider"

    def make_hooks(self, params: NamedParams) -> TrainHooks:
        self._hooks = SpiderHooks(params)
        return self._hooks

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "extra_state_bytes_per_param": EXTRA_STATE_BYTES_PER_PARAM}
