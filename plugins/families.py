"""Architecture families: everything deltaserve knows about a model layout, declared once per family.

The rest of deltaserve is architecture-neutral: it asks the base's family (found from
``config.json``'s ``model_type``) for

- the **naming** between a checkpoint's tensor names (the keys of the base's
  safetensors files, which bundles use and the fingerprint covers) and transformers'
  module tree (what PEFT and the tuning code see): a list of prefix pairs;
- the **parts** the tuning scope is made of (transformers module prefixes): the
  vision tower, the projector (connector), the decoder layers, the LM head; and the
  checkpoint prefix of the language model (where additive deltas may attach) and of
  its decoder layers (where vLLM serves LoRA).

vLLM's side needs no table: the server resolves checkpoint names with the model's own
``hf_to_vllm_mapper`` and ``packed_modules_mapping`` (:mod:`deltaserve.server.worker_patches`).

Adding a family is one :class:`Family` entry here (plus a base builder in
:mod:`deltaserve.tuning.base.factory` for a tiny test model).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    """``model_type`` values of ``config.json`` that belong to the family."""
    model_class: str
    """The transformers class of a whole model (``transformers.<model_class>``)."""
    checkpoint_prefixes: tuple[tuple[str, str], ...]
    """(transformers module prefix, checkpoint prefix) pairs; names outside them are the same in both."""
    vision_tower: str
    """Module prefix of the vision encoder (frozen by default when tuning)."""
    projector: str
    """Module prefix of the vision→language projector (connector)."""
    decoder_layers: str
    """Module prefix of the decoder layers, followed by the layer index."""
    lm_head: str
    """Module prefix of the LM head (output embedding)."""
    language_model: str
    """Checkpoint prefix of the language model (decoder, norms, LM head)."""

    def to_checkpoint(self, name: str) -> str:
        """transformers module/parameter name → checkpoint name."""
        for module_prefix, ckpt_prefix in self.checkpoint_prefixes:
            if name.startswith(module_prefix):
                return ckpt_prefix + name[len(module_prefix) :]
        return name

    def to_module(self, name: str) -> str:
        """Checkpoint name → transformers module/parameter name (inverse of :meth:`to_checkpoint`)."""
        for module_prefix, ckpt_prefix in self.checkpoint_prefixes:
            if name.startswith(ckpt_prefix):
                return module_prefix + name[len(ckpt_prefix) :]
        return name

    @property
    def decoder_layers_checkpoint(self) -> str:
        """Checkpoint prefix of the decoder layers (where vLLM serves LoRA)."""
        return self.to_checkpoint(self.decoder_layers)

    def model_cls(self):
        import transformers

        return getattr(transformers, self.model_class)


LLAVA = Family(
    name="llava",
    model_types=("llava",),
    model_class="LlavaForConditionalGeneration",
    # The Hub layout, which vLLM 0.32 requires for LLaVA; transformers 5.x renames on load.
    checkpoint_prefixes=(
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
    ),
    vision_tower="model.vision_tower.",
    projector="model.multi_modal_projector.",
    decoder_layers="model.language_model.layers.",
    lm_head="lm_head.",
    language_model="language_model.",
)

QWEN2_VL = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    checkpoint_prefixes=(),  # written as transformers 5.x saves it, which vLLM's weight mapper reads
    vision_tower="model.visual.",
    projector="model.visual.merger.",
    decoder_layers="model.language_model.layers.",
    lm_head="lm_head.",
    language_model="model.language_model.",
)

QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    # The Hub layout of the published checkpoints (e.g. Qwen/Qwen2.5-VL-7B-Instruct, saved before transformers
    # nested the modules): `visual.*` and `model.*` (the decoder); transformers 5.x renames on load
    # (conversion_mapping.py, `^visual` → `model.visual`, `^model` → `model.language_model`), vLLM's weight
    # mapper reads it. A checkpoint re-saved by transformers 5.x (`model.language_model.*`) is not this layout.
    checkpoint_prefixes=(
        ("model.visual.", "visual."),
        ("model.language_model.", "model."),
    ),
    vision_tower="model.visual.",
    projector="model.visual.merger.",
    decoder_layers="model.language_model.layers.",
    lm_head="lm_head.",
    language_model="model.",
)

FAMILIES = (LLAVA, QWEN2_VL, QWEN2_5_VL)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown architecture `{name}` (known: {', '.join(f.name for f in FAMILIES)})")


def family_of(config) -> Family:
    """The family of a model: its transformers config, a ``config.json`` dict, or anything with a ``config``."""
    config = getattr(config, "config", config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    raise ValueError(f"unsupported architecture: model_type `{model_type}` (known: {[f.name for f in FAMILIES]})")
