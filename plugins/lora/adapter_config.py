"""PEFT LoRA adapter files: ``adapter_config.json`` checks and tensor-key parsing.

Keys as PEFT writes them: ``base_model.model.<module name>.lora_A.weight`` ([r, in])
and ``….lora_B.weight`` ([out, r]); ``<module name>`` is the transformers module path
(``model.language_model.layers.0.self_attn.q_proj``) or the checkpoint path — both
map to one checkpoint name through :mod:`deltaserve.plugins.naming`.
"""

from __future__ import annotations

import re

from deltaserve.plugins.kind_checks import is_int, is_number

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
KEY_RE = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight")

# adapter_config fields that vLLM's multi-LoRA (and our exact reference) do not serve; set → problem.
_UNSUPPORTED = {
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias terms",
    "modules_to_save": "fully trained extra modules (`modules_to_save`)",
    "rank_pattern": "per-module ranks (`rank_pattern`)",
    "alpha_pattern": "per-module alphas (`alpha_pattern`)",
    "fan_in_fan_out": "transposed (Conv1D) weights",
    "target_parameters": "LoRA on bare parameters",
    "trainable_token_indices": "trainable token embeddings",
    "layer_replication": "layer replication",
    "use_qalora": "QA-LoRA",
    "alora_invocation_tokens": "activated LoRA",
}


def adapter_config_problems(cfg: object) -> list[str]:
    """Problems of a decoded ``adapter_config.json``."""
    if not isinstance(cfg, dict):
        return [f"`{ADAPTER_CONFIG}` must be a JSON object"]
    problems = []
    if cfg.get("peft_type") != "LORA":
        problems.append(f'`{ADAPTER_CONFIG}` `peft_type` must be "LORA", got {cfg.get("peft_type")!r}')
    if not is_int(cfg.get("r"), minimum=1):
        problems.append(f"`{ADAPTER_CONFIG}` `r` must be a positive integer")
    if not is_number(cfg.get("lora_alpha")):
        problems.append(f"`{ADAPTER_CONFIG}` `lora_alpha` must be a number")
    targets = cfg.get("target_modules")
    if not (isinstance(targets, str) and targets) and not (
        isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)
    ):
        problems.append(f"`{ADAPTER_CONFIG}` `target_modules` must be a regex string or a non-empty list of names")
    if cfg.get("bias", "none") not in ("none", None):
        problems.append(f'`{ADAPTER_CONFIG}` `bias` must be "none": bias training is not supported')
    if not isinstance(cfg.get("use_rslora", False), bool):
        problems.append(f"`{ADAPTER_CONFIG}` `use_rslora` must be a boolean")
    for field, what in _UNSUPPORTED.items():
        if cfg.get(field):
            problems.append(f"`{ADAPTER_CONFIG}` `{field}` is set: {what} is not supported")
    return problems


def peft_key(checkpoint_name: str, part: str, family) -> str:
    """The PEFT key of factor ``part`` ("A" or "B") of a checkpoint module, in the transformers layout PEFT writes
    (``family``: the base's :class:`~deltaserve.plugins.families.Family`)."""
    return f"base_model.model.{family.to_module(checkpoint_name)}.lora_{part}.weight"
