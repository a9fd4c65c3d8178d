"""``full``: dense fine-tuning of the whole scope — the dense limit of selective tuning, the baseline."""

from __future__ import annotations

from deltaserve.tuning.methods.scope import NamedParams
from deltaserve.tuning.methods.selective import ScopeHooks, SelectiveMethod
from deltaserve.tuning.train import TrainHooks


class FullMethod(SelectiveMethod):
    """Every parameter of the scope trains; no extra state beyond AdamW's two moments (8 B/param)."""

    name = "full"

    def make_hooks(self, params: NamedParams) -> TrainHooks:
        return ScopeHooks(params)
