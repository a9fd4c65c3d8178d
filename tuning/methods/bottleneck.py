"""``bottleneck``: additive adapters on the outputs of the scope's attention and MLP projections.

Houlsby et al., "Parameter-Efficient Transfer Learning for NLP", ICML 2019
(https://arxiv.org/abs/1902.00751): ``y' = y + s · up(act(down(y)))`` after ``o_proj`` and
``down_proj`` of each in-scope decoder layer. The adapters are the plugins'
:class:`~deltaserve.plugins.bottleneck.BottleneckAdapter`, attached with the same
:func:`~deltaserve.plugins.bottleneck.attach_adapters` the `bottleneck` kind uses to serve
them — the trained module *is* the applied one. ``up`` starts at zero (identity).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltaserve.plugins.families import family_of
from deltaserve.tuning.methods.base import TuningMethod
from deltaserve.tuning.methods.selective import ScopeHooks
from deltaserve.tuning.train import TrainHooks

if TYPE_CHECKING:
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.manifest import MethodInfo, TaskInfo


class BottleneckMethod(TuningMethod):
    name = "bottleneck"
    kind = "bottleneck"
    default_lr = 3e-3

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, TrainHooks]:
        from deltaserve.plugins.bottleneck import BottleneckAdapter, attach_adapters

        o = self.options
        modules, family = dict(model.named_modules()), family_of(model)
        self._adapters = {}
        for name in self.scope.decoder_linears(model, o.bottleneck_targets):
            linear = modules[name]
            self._adapters[family.to_checkpoint(name)] = BottleneckAdapter(
                linear.out_features,
                o.bottleneck_dim,
                o.bottleneck_activation,
                o.bottleneck_scaling,
                dtype=linear.weight.dtype,
                device=linear.weight.device,
            )
        self.attached = attach_adapters(model, self._adapters, "bottleneck:tuning")
        params = [
            (f"{module}.{n}", p) for module, adapter in self._adapters.items() for n, p in adapter.named_parameters()
        ]
        return model, ScopeHooks(params)

    def export(
        self,
        out: Path,
        *,
        name: str,
        base: BaseSpec,
        base_dir: Path,
        task: TaskInfo,
        info: MethodInfo,
        extra_files: dict[str, bytes],
    ) -> Path:
        from deltaserve.plugins.bottleneck import write_bottleneck_bundle

        numel = sum(p.numel() for a in self._adapters.values() for p in a.parameters())
        self._stats = {"trainable_params": numel, "delta_params": numel}
        return write_bottleneck_bundle(
            out, name=name, base=base, adapters=self._adapters, task=task, method=info, extra_files=extra_files
        )

    def hyperparameters(self) -> dict:
        o = self.options
        return {
            **super().hyperparameters(),
            "bottleneck_dim": o.bottleneck_dim,
            "activation": o.bottleneck_activation,
            "scaling": o.bottleneck_scaling,
            "targets": list(o.bottleneck_targets),
            "placement": "output",
        }

    def stats(self) -> dict:
        return dict(getattr(self, "_stats", {}))
