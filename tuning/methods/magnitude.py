"""``magnitude``: per tensor, the largest-|w0| fraction stays frozen; the rest fine-tunes.

The selective-tuning baseline of the SPIDER paper (Huang et al., ICML 2025, the authors'
``MagnitudeMask`` trainer): large pre-trained weights are taken to carry the general
knowledge. A fixed mask per tensor — the ``int(numel · ratio)`` largest |w0| — is frozen
by zeroing their gradients before clipping and the optimizer step (so the clip norm and
AdamW's moments see only trainable coordinates), and the frozen values are written back
after each step, which keeps them bit-exact even with weight decay.

Extra state per scope parameter: the frozen mask (1 B, bool) and the frozen values
(4 B · ratio, fp32) — 3 B/param at the default ratio 0.5 — plus AdamW's 8 B.
"""

from __future__ import annotations

import torch

from deltaserve.tuning.methods.scope import NamedParams
from deltaserve.tuning.methods.selective import ScopeHooks, SelectiveMethod
from deltaserve.tuning.train import TrainHooks


def magnitude_mask(w0: torch.Tensor, ratio: float) -> torch.Tensor:
    """Bool mask of the ``int(numel · ratio)`` entries of largest |w0| (ties broken by ``topk``)."""
    flat = w0.detach().abs().reshape(-1)  # [numel]
    frozen = torch.zeros(flat.numel(), dtype=torch.bool, device=w0.device)
    k = int(flat.numel() * ratio)
    if k > 0:
        frozen[torch.topk(flat, k).indices] = True
    return frozen.reshape(w0.shape)


class MagnitudeHooks(ScopeHooks):
    def __init__(self, params: NamedParams, ratio: float):
        super().__init__(params)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"`magnitude_ratio` must lie in [0, 1), got {ratio}")
        self.ratio = ratio
        self.frozen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name → (mask, frozen values [k])

    def on_start(self, model, params) -> None:
        for name, p in params:
            mask = magnitude_mask(p, self.ratio)
            self.frozen[name] = (mask, p.detach()[mask].clone())

    def after_backward(self, step, model, params) -> None:
        for name, p in params:
            if p.grad is not None:
                p.grad.masked_fill_(self.frozen[name][0], 0.0)

    @torch.no_grad()
    def after_step(self, step, model, params) -> None:
        for name, p in params:
            mask, values = self.frozen[name]
            p[mask] = values

    def on_end(self, model, params) -> None:
        self.frozen.clear()


class MagnitudeMethod(SelectiveMethod):
    name = "magnitude"

    def make_hooks(self, params: NamedParams) -> TrainHooks:
        return MagnitudeHooks(params, self.options.magnitude_ratio)

    def hyperparameters(self) -> dict:
        return {**super().hyperparameters(), "ratio": self.options.magnitude_ratio}
