"""IA³ as a third-party deltaserve kind (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and
Cheaper than In-Context Learning", NeurIPS 2022; PEFT's ``IA3Config``): learned vectors rescale activations.

- attention / output modules (``config.modules`` minus ``config.feedforward``): ``y ↦ y · l`` (l: out_features);
- feed-forward modules (``config.feedforward``): ``x ↦ x · l`` before the layer (l: in_features).

Bundle: ``ia3.safetensors`` holding ``{module}.ia3_l`` (1-D) per module (checkpoint names);
``config = {"modules": [...], "feedforward": [...]}``. This package is installed only through its
``deltaserve.plugins`` entry point (``ia3 = deltaserve_ia3:IA3Kind``): nothing in deltaserve names it.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from deltaserve.plugins.kind import AppliedDelta, DeltaKind
from deltaserve.plugins.families import family_of
from deltaserve.plugins.serving import ServingPlan

FILE = "ia3.safetensors"


def _scale(t: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741  (the paper's name)
    return t * l.to(t.dtype)


class IA3Kind(DeltaKind):
    name = "ia3"

    def validate(self, bundle, base) -> list[str]:
        config = bundle.manifest.config
        modules, feedforward = config.get("modules"), config.get("feedforward", [])
        if not isinstance(modules, list) or not modules or not set(feedforward) <= set(modules):
            return ["`config.modules` must be a non-empty list containing `config.feedforward`"]
        tensors = bundle.load_tensors(FILE)
        problems = []
        shapes = base.module_shapes() if base is not None else {}
        for module in modules:
            vector = tensors.get(f"{module}.ia3_l")
            if vector is None or vector.dim() != 1:
                problems.append(f"`{module}.ia3_l` must be a 1-D tensor in {FILE}")
                continue
            if module in shapes:
                out_features, in_features = shapes[module]
                want = in_features if module in feedforward else out_features
                if vector.numel() != want:
                    problems.append(f"`{module}.ia3_l` has {vector.numel()} entries, the module needs {want}")
            elif base is not None:
                problems.append(f"module `{module}` is not a linear module of the base")
        return problems

    def apply(self, model, bundle) -> AppliedDelta:
        config, tensors = bundle.manifest.config, bundle.load_tensors(FILE)
        modules = dict(model.named_modules())
        handles = []
        for module in config["modules"]:
            target, vector = modules[family_of(model).to_module(module)], tensors[f"{module}.ia3_l"]
            if module in config.get("feedforward", []):
                hook = target.register_forward_pre_hook(lambda _m, args, v=vector: (_scale(args[0], v), *args[1:]))
            else:
                hook = target.register_forward_hook(lambda _m, _args, out, v=vector: _scale(out, v))
            handles.append(hook)
        return AppliedDelta(model, lambda: [h.remove() for h in handles], f"ia3:{bundle.manifest.name}")

    def serving_plan(self, bundle_dir: Path, config: dict) -> ServingPlan:
        from safetensors.torch import load_file

        tensors = load_file(str(bundle_dir / FILE))
        feedforward = set(config.get("feedforward", []))
        maps = {m: partial(_scale, l=tensors[f"{m}.ia3_l"]) for m in config["modules"]}
        return ServingPlan(
            outputs={m: f for m, f in maps.items() if m not in feedforward},
            inputs={m: f for m, f in maps.items() if m in feedforward},
        )
