"""The `lora` kind: low-rank factors on linear modules of the language model (a PEFT adapter).

Bundle layout: a PEFT adapter directory (``adapter_config.json``,
``adapter_model.safetensors``) plus ``delta.json`` whose ``config`` is
``{"r": int, "lora_alpha": number, "modules": [checkpoint module names]}``. PEFT
(``PeftModel.from_pretrained``) and vLLM (``LoRARequest``) read the directory as is.
Targets must be linear modules of the language model's decoder layers: vLLM applies
LoRA only there. Adapter weights must be floating point, A and B of one dtype (PEFT
keeps adapters in float32 even on half-precision bases, so the base dtype is not required).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltaserve.plugins.kind import AppliedDelta, DeltaKind
from deltaserve.plugins.kind_checks import dtype_name, required_file, required_tensors, unexpected_fields
from deltaserve.plugins.lora.adapter_config import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    KEY_RE,
    adapter_config_problems,
    peft_key,
)
from deltaserve.plugins.families import FAMILIES, family_of

if TYPE_CHECKING:
    from pathlib import Path

    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import Bundle

ADAPTER_NAME = "deltaserve"  # PEFT adapter name inside the model while applied


def group_factors(tensors: dict[str, torch.Tensor], family) -> tuple[dict[str, dict[str, torch.Tensor]], list[str]]:
    """PEFT keys → {checkpoint module: {"A": [r, in], "B": [out, r]}}, plus unexpected-key problems
    (``family``: the base's :class:`~deltaserve.plugins.families.Family`, which names checkpoint modules)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    problems = []
    for key, tensor in tensors.items():
        match = KEY_RE.fullmatch(key)
        if match is None:
            problems.append(
                f"unexpected tensor `{key}` in `{ADAPTER_WEIGHTS}` (only `base_model.model.<module>.lora_A/B.weight`)"
            )
            continue
        grouped.setdefault(family.to_checkpoint(match["module"]), {})[match["part"]] = tensor
    return grouped, problems


def _factor_problems(
    module: str, factors: dict[str, torch.Tensor], r: object, shapes: dict[str, tuple[int, int]] | None, families
) -> list[str]:
    """Problems of one module's factors; ``shapes`` is the base's ``module_shapes()`` (None: no base), ``families``
    the base's family (or every known one, without a base)."""
    if set(factors) != {"A", "B"}:
        missing = ({"A", "B"} - set(factors)).pop()
        return [f"missing tensor: the LoRA pair of `{module}` has no `lora_{missing}`"]
    a, b = factors["A"], factors["B"]  # [r, in], [out, r]
    problems = []
    prefixes = tuple(f.decoder_layers_checkpoint for f in families)
    if not module.startswith(prefixes):
        problems.append(
            f"LoRA target `{module}` is outside the language model's decoder layers (`{prefixes[0]}…`): "
            "vLLM applies LoRA only to the language model"
        )
    if a.dim() != 2 or b.dim() != 2:
        return problems + [f"LoRA factors of `{module}` must be 2-D, got {list(a.shape)} and {list(b.shape)}"]
    if a.shape[0] != r or b.shape[1] != r:
        problems.append(f"LoRA rank of `{module}` is {a.shape[0]}/{b.shape[1]} (A/B), `r` is {r}")
    if shapes is not None and module not in shapes:
        problems.append(f"LoRA target `{module}` is not a linear module of the base")
    elif shapes is not None and (b.shape[0], a.shape[1]) != shapes[module]:
        problems.append(
            f"LoRA of `{module}` maps {a.shape[1]} → {b.shape[0]}, the base module maps {shapes[module][1]} → {shapes[module][0]}"
        )
    if not (a.is_floating_point() and b.dtype == a.dtype):
        problems.append(
            f"LoRA factors of `{module}` must share one floating dtype, got {dtype_name(a)} and {dtype_name(b)}"
        )
    return problems


class LoraKind(DeltaKind):
    """LoRA via PEFT (served by vLLM's own multi-LoRA, beside base traffic)."""

    name = "lora"
    engine = "vllm_lora"

    def lora_dir(self, bundle_dir: Path) -> Path:
        return bundle_dir  # the bundle is a PEFT adapter directory (adapter_config.json + weights)

    def recognises(self, directory: Path) -> bool:
        return (directory / ADAPTER_CONFIG).is_file()  # a plain PEFT adapter directory

    def import_directory(self, src: Path, out: Path, *, name: str, base: BaseSpec) -> Path:
        from deltaserve.plugins.lora.writer import import_peft_adapter

        return import_peft_adapter(src, out, name=name, base=base)

    def validate(self, bundle: Bundle, base: BaseSpec | None) -> list[str]:
        problems: list[str] = []
        adapter_config = bundle.read_json(ADAPTER_CONFIG) if required_file(bundle, ADAPTER_CONFIG, problems) else None
        if adapter_config is not None:
            problems += adapter_config_problems(adapter_config)
        tensors = required_tensors(bundle, ADAPTER_WEIGHTS, problems)
        if tensors is None or not isinstance(adapter_config, dict):
            return problems
        # Without a base, the family is the one under which the PEFT keys name the manifest's modules.
        families = [base.family] if base is not None else list(FAMILIES)
        for family in families:
            grouped, key_problems = group_factors(tensors, family)
            if sorted(grouped) == bundle.manifest.config.get("modules"):
                break
        problems += key_problems
        if not grouped:
            problems.append(f"`{ADAPTER_WEIGHTS}` holds no LoRA factors")
        shapes = base.module_shapes() if base is not None else None
        for module, factors in sorted(grouped.items()):
            problems += _factor_problems(module, factors, adapter_config.get("r"), shapes, families)
        config = bundle.manifest.config
        problems += unexpected_fields(config, ("r", "lora_alpha", "modules"), "config")
        for field in ("r", "lora_alpha"):
            if config.get(field) != adapter_config.get(field):
                problems.append(
                    f"`config.{field}` is {config.get(field)!r}, `{ADAPTER_CONFIG}` says {adapter_config.get(field)!r}"
                )
        if config.get("modules") != sorted(grouped):
            problems.append(f"`config.modules` must list the LoRA targets of `{ADAPTER_WEIGHTS}`, sorted")
        return problems

    def apply(self, model: torch.nn.Module, bundle: Bundle) -> AppliedDelta:
        """Inject PEFT LoRA layers for exactly the bundle's modules, load the factors; remove unloads them."""
        from peft import LoraConfig, set_peft_model_state_dict
        from peft.tuners.lora import LoraModel

        if hasattr(model, "peft_config"):
            raise ValueError("the model already carries PEFT adapters; remove them before applying a `lora` bundle")
        adapter_config = bundle.read_json(ADAPTER_CONFIG)
        family = family_of(model)
        grouped, _ = group_factors(bundle.load_tensors(ADAPTER_WEIGHTS), family)
        # Exact module names (not the bundle's target_modules pattern): only modules with factors get a layer.
        lora_config = LoraConfig(
            r=adapter_config["r"],
            lora_alpha=adapter_config["lora_alpha"],
            use_rslora=adapter_config.get("use_rslora", False),
            target_modules=[family.to_module(m) for m in sorted(grouped)],
            lora_dropout=0.0,
            inference_mode=True,
        )
        requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}  # PEFT freezes the base
        tuner = LoraModel(model, lora_config, adapter_name=ADAPTER_NAME)
        state = {
            peft_key(m, part, family): tensor for m, factors in grouped.items() for part, tensor in factors.items()
        }
        result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER_NAME)
        missing = [k for k in result.missing_keys if f".{ADAPTER_NAME}." in k]
        if result.unexpected_keys or missing:
            tuner.unload()
            raise RuntimeError(
                f"PEFT did not load the adapter exactly: missing {missing}, unexpected {result.unexpected_keys}"
            )

        def undo() -> None:
            tuner.unload()  # puts the original nn.Linear objects back (their tensors were never written)
            for name, param in model.named_parameters():
                param.requires_grad_(requires_grad[name])

        return AppliedDelta(model, undo, f"lora:{bundle.manifest.name}")
