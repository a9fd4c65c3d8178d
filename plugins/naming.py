"""Parameter names: checkpoint (Hub) names ↔ transformers module names.

Bundles name base parameters and modules by their **checkpoint names** — the keys of
the base's ``*.safetensors`` files, which the fingerprint covers and vLLM reads.
For LLaVA those are the Hub layout (``language_model.model.layers.0.mlp.down_proj``);
transformers 5.x builds a different module tree (``model.language_model.layers.0…``)
and maps the names when it loads. These two functions are that mapping, in both
directions; a name outside the known prefixes is returned unchanged (other
architectures use the same names in both places).
"""

from __future__ import annotations

# (transformers 5.x module prefix, checkpoint prefix) for LlavaForConditionalGeneration.
_LLAVA_PREFIXES = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def module_to_checkpoint(name: str) -> str:
    """``model.language_model.layers.0.mlp.down_proj.weight`` → ``language_model.model.layers.0.mlp.down_proj.weight``."""
    for module_prefix, ckpt_prefix in _LLAVA_PREFIXES:
        if name.startswith(module_prefix):
            return ckpt_prefix + name[len(module_prefix) :]
    return name


def checkpoint_to_module(name: str) -> str:
    """Inverse of :func:`module_to_checkpoint`."""
    for module_prefix, ckpt_prefix in _LLAVA_PREFIXES:
        if name.startswith(ckpt_prefix):
            return module_prefix + name[len(ckpt_prefix) :]
    return name
