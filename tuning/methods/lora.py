"""``lora``: low-rank factors on the scope's decoder linear layers, trained with PEFT.

Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022
(https://arxiv.org/abs/2106.09685). The base stays frozen; each target ``W`` gets
``W + alpha/r · B A`` (A: PEFT's Kaiming init, B: zeros, no dropout so training is
deterministic per seed). Targets are the linear modules of the in-scope decoder layers
only — the projector is outside vLLM's LoRA reach, so a served LoRA delta could not carry it.
The bundle is a PEFT adapter directory (``PeftModel.from_pretrained`` and vLLM read it).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from deltaserve.tuning.methods.base import TuningMethod
from deltaserve.tuning.methods.selective import ScopeHooks
from deltaserve.tuning.train import TrainHooks

if TYPE_CHECKING:
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.manifest import MethodInfo, TaskInfo


class LoraMethod(TuningMethod):
    name = "lora"
    kind = "lora"
    default_lr = 3e-3

    def prepare(self, model: torch.nn.Module) -> tuple[torch.nn.Module, TrainHooks]:
        from peft import LoraConfig, get_peft_model

        targets = self.scope.decoder_linears(model, self.options.lora_targets)
        config = LoraConfig(
            r=self.options.lora_r,
            lora_alpha=self.options.lora_alpha,
            target_modules=targets,
            lora_dropout=0.0,
            bias="none",
        )
        self._peft = get_peft_model(model, config)
        params = [(n, p) for n, p in self._peft.named_parameters() if ".lora_A." in n or ".lora_B." in n]
        return self._peft, ScopeHooks(params)

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
        from peft import get_peft_model_state_dict

        from deltaserve.plugins.lora import write_lora_bundle

        adapter_config = self._peft.peft_config["default"].to_dict()
        adapter_config["base_model_name_or_path"] = base.name  # not the local path of the tuning machine
        tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self._peft).items()}
        numel = sum(t.numel() for t in tensors.values())
        self._stats = {"trainable_params": numel, "delta_params": numel}
        return write_lora_bundle(
            out,
            name=name,
            base=base,
            adapter_config=adapter_config,
            tensors=tensors,
            task=task,
            method=info,
            extra_files=extra_files,
        )

    def hyperparameters(self) -> dict:
        o = self.options
        return {
            **super().hyperparameters(),
            "r": o.lora_r,
            "lora_alpha": o.lora_alpha,
            "targets": list(o.lora_targets),
            "dropout": 0.0,
        }

    def stats(self) -> dict:
        return dict(getattr(self, "_stats", {}))
