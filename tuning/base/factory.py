"""Build the embedded default base: a tiny LLaVA (CLIP vision tower + projector + Llama decoder).

The architecture is the one of the seed papers' experiments (LLaVA), at a size that
runs on two CPU cores: 32×32 images cut into 8×8 patches (16 image tokens after the
CLS feature is dropped), a 2-layer CLIP tower, a 2-layer MLP projector and a
4-layer Llama decoder. vLLM and transformers both load the written directory.

Determinism: the same seed gives byte-identical files (tokenizer training is
deterministic, weights come from a seeded CPU generator, JSON is written with
sorted keys), hence the same fingerprint.

Layout: weights are written with the Hugging Face *Hub* LLaVA key names
(``language_model.model.…``, ``vision_tower.vision_model.…``,
``multi_modal_projector.…``, ``language_model.lm_head.weight``). transformers
5.x maps them onto its own module tree when loading, and vLLM 0.32 only accepts
this layout (the names ``save_pretrained`` writes fail in vLLM with "There is no
module or parameter named 'vision_tower.embeddings'").
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltaserve.plugins.families import LLAVA
from deltaserve.tuning.base.tokenizer import CHAT_TEMPLATE, IMAGE, build_tokenizer

WEIGHTS_FILE = "model.safetensors"
# CLIP's normalisation constants (what CLIPImageProcessor uses by default).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class TinyBaseConfig:
    """Sizes of the tiny base. The defaults are the embedded default."""

    image_size: int = 32
    """Input images are resized and centre-cropped to this square size (pixels)."""
    patch_size: int = 8
    """CLIP patch size: (image_size / patch_size)^2 image tokens per image."""
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    text_hidden: int = 128
    text_intermediate: int = 384
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    """Fewer KV heads than query heads (GQA), as in current Llama models."""
    max_positions: int = 512
    vision_feature_layer: int = -1
    """Which hidden state of the tower feeds the projector (-1: the last layer's output)."""
    image_mean: tuple[float, float, float] = tuple(_CLIP_MEAN)
    image_std: tuple[float, float, float] = tuple(_CLIP_STD)
    """Per-channel normalisation of the image processor (CLIP's constants by default)."""
    initializer_range: float = 0.3
    """Wide on purpose: with transformers' default 0.02 a random tiny model answers every
    prompt with the same token, and equality tests between engines would pass vacuously."""

    @property
    def image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def hf_config(cfg: TinyBaseConfig, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden,
        intermediate_size=2 * cfg.vision_hidden,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
        projection_dim=cfg.vision_hidden,
        initializer_range=cfg.initializer_range,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_intermediate,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        vocab_size=len(tokenizer),
        max_position_embeddings=cfg.max_positions,
        initializer_range=cfg.initializer_range,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE),
        image_seq_length=cfg.image_tokens,
        vision_feature_select_strategy="default",  # drop CLS: 16 image tokens for 32x32 / 8
        vision_feature_layer=cfg.vision_feature_layer,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
    )


def build_processor(cfg: TinyBaseConfig, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    image_processor = CLIPImageProcessor(
        size={"shortest_edge": cfg.image_size},
        crop_size={"height": cfg.image_size, "width": cfg.image_size},
        image_mean=list(cfg.image_mean),
        image_std=list(cfg.image_std),
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # the CLS feature, dropped again by "default"
        chat_template=CHAT_TEMPLATE,
    )


def init_model(cfg: TinyBaseConfig, tokenizer, seed: int):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(hf_config(cfg, tokenizer))
    return model.float().eval()


def save_model_dir(model, tokenizer, processor, out: Path, extra_meta: dict | None = None) -> None:
    """Write config, Hub-layout safetensors, tokenizer and processor into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {LLAVA.to_checkpoint(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(dict(sorted(tensors.items())), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = ["LlavaForConditionalGeneration"]
    config.pop("transformers_version", None)
    _write_json(out / "config.json", config)
    _write_json(
        out / "generation_config.json",
        {
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
    )
    processor.save_pretrained(str(out))
    for name in ("tokenizer_config.json", "processor_config.json", "preprocessor_config.json"):
        path = out / name
        if path.exists():  # re-write with sorted keys: byte-identical across runs
            _write_json(path, json.loads(path.read_text()))
    _write_json(out / "deltaserve-base.json", {"format_version": 1, **(extra_meta or {})})


def build_base(out: Path, seed: int = 0, cfg: TinyBaseConfig | None = None) -> Path:
    """Build the tiny random-init base into ``out`` (created). Returns ``out``."""
    cfg = cfg or TinyBaseConfig()
    tokenizer = build_tokenizer()
    processor = build_processor(cfg, tokenizer)
    model = init_model(cfg, tokenizer, seed)
    save_model_dir(model, tokenizer, processor, Path(out), {"seed": seed, "sizes": asdict(cfg), "stage": "random-init"})
    return Path(out)


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
