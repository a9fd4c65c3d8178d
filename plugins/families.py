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

A family may know several checkpoint **layouts** (the same modules under different
tensor names: Qwen2-VL's published checkpoints keep transformers 4.x's ``visual.*`` /
``model.*``, a checkpoint re-saved by transformers 5.x nests them as ``model.visual.*`` /
``model.language_model.*``; vLLM and transformers read both). The layout of a base is
read from its tensor names (:meth:`Family.for_checkpoint`): :func:`family_of` does so
for a model or config loaded from a local directory, ``BaseSpec.family`` from the
names it holds.

Adding a family is one :class:`Family` entry here (plus a base builder in
:mod:`deltaserve.tuning.base.factory` for a tiny test model).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path


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
    other_layouts: tuple[tuple[tuple[tuple[str, str], ...], str], ...] = ()
    """Further checkpoint layouts a base of the family may have: (``checkpoint_prefixes``, ``language_model``)
    pairs; the fields above are the default layout (the one of a base built by deltaserve)."""

    def for_checkpoint(self, names) -> Family:
        """The family in the layout of a checkpoint with tensor ``names``: the first layout (default first) under
        which the checkpoint holds the decoder layers; the default when none does."""
        names = list(names)
        for prefixes, language_model in ((self.checkpoint_prefixes, self.language_model), *self.other_layouts):
            layout = dataclasses.replace(self, checkpoint_prefixes=prefixes, language_model=language_model)
            layers = layout.decoder_layers_checkpoint
            if any(n.startswith(layers) for n in names):
                return layout
        return self

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

QWEN_HUB_LAYOUT = ((("model.visual.", "visual."), ("model.language_model.", "model.")), "model.")
"""The layout of the published Qwen2-VL / Qwen2.5-VL checkpoints (saved before transformers nested the modules):
``visual.*`` and ``model.*`` (the decoder). transformers 5.x renames on load (conversion_mapping.py, ``^visual`` →
``model.visual``, ``^model`` → ``model.language_model``); vLLM's weight mapper reads it."""
QWEN_NESTED_LAYOUT = ((), "model.language_model.")
"""The layout transformers 5.x saves (module names as they are), which vLLM's weight mapper reads too."""

QWEN2_VL = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    model_class="Qwen2VLForConditionalGeneration",
    checkpoint_prefixes=QWEN_NESTED_LAYOUT[0],  # the tiny base is saved by transformers 5.x
    vision_tower="model.visual.",
    projector="model.visual.merger.",
    decoder_layers="model.language_model.layers.",
    lm_head="lm_head.",
    language_model=QWEN_NESTED_LAYOUT[1],
    other_layouts=(QWEN_HUB_LAYOUT,),  # e.g. Qwen/Qwen2-VL-7B-Instruct
)

QWEN2_5_VL = Family(
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    model_class="Qwen2_5_VLForConditionalGeneration",
    checkpoint_prefixes=QWEN_HUB_LAYOUT[0],  # the published checkpoints, e.g. Qwen/Qwen2.5-VL-7B-Instruct
    vision_tower="model.visual.",
    projector="model.visual.merger.",
    decoder_layers="model.language_model.layers.",
    lm_head="lm_head.",
    language_model=QWEN_HUB_LAYOUT[1],
    other_layouts=(QWEN_NESTED_LAYOUT,),  # re-saved by transformers 5.x
)

FAMILIES = (LLAVA, QWEN2_VL, QWEN2_5_VL)


def family_named(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise ValueError(f"unknown architecture `{name}` (known: {', '.join(f.name for f in FAMILIES)})")


def family_of(config, names=None) -> Family:
    """The family of a model: its transformers config, a ``config.json`` dict, or anything with a ``config``; in
    the layout of the checkpoint with tensor ``names`` — by default, of the local directory the transformers
    config was loaded from (``_name_or_path``), if any; else the family's default layout."""
    config = getattr(config, "config", config)
    model_type = config.get("model_type") if isinstance(config, dict) else getattr(config, "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            if not family.other_layouts:
                return family
            if names is None:
                names = _checkpoint_names(str(getattr(config, "_name_or_path", "") or ""))
            return family.for_checkpoint(names) if names else family
    raise ValueError(f"unsupported architecture: model_type `{model_type}` (known: {[f.name for f in FAMILIES]})")


@functools.lru_cache(maxsize=32)
def _checkpoint_names(directory: str) -> tuple[str, ...]:
    """The tensor names of the safetensors files in ``directory`` (headers only), or () when there are none."""
    if not directory or not Path(directory).is_dir():
        return ()
    from deltaserve.plugins.safetensors_header import read_header

    names: list[str] = []
    for file in sorted(Path(directory).glob("*.safetensors")):
        names += read_header(file)[0]
    return tuple(names)
