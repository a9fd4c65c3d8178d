"""Build the tiny bases: the embedded default, a tiny LLaVA (CLIP vision tower + projector + Llama
decoder), and a tiny Qwen2-VL (``build_base(..., arch="qwen2_vl")``).

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

Qwen2-VL (:class:`TinyQwen2VLConfig`): a 2-layer ViT with 2-D rotary positions (8×8 patches, 2 frames
per temporal patch, 2×2 patches merged into one token: a 32×32 image is 4×4 patches → **4 image tokens**),
the patch merger, and a 4-layer Qwen2 decoder with M-RoPE (``mrope_section`` 4+6+6 = head_dim/2). Its
weights are written with transformers 5.x's own module names (``model.language_model.…``,
``model.visual.…``, ``lm_head.weight``: what ``save_pretrained`` writes). vLLM 0.32's loader maps exactly
these (``Qwen2VLForConditionalGeneration.hf_to_vllm_mapper``: ``model.language_model.`` →
``language_model.model.``, ``model.visual.`` → ``visual.``) and transformers loads them without renaming.
The checkpoint names of each family are declared in :mod:`deltaserve.plugins.families`.

Prompts: :func:`format_prompt`, keyed by ``config.model_type`` (so existing base directories need no new
field). LLaVA: ``<image>`` newline, question, newline, ``Answer:``, after the BOS its tokenizer adds.
Qwen2-VL: Qwen's chat layout, ``<|im_start|>user`` newline, ``<|vision_start|><|image_pad|><|vision_end|>``,
question, ``<|im_end|>`` newline, ``<|im_start|>assistant`` newline (no BOS, no default system turn).
Either base's chat template renders a one-turn chat to exactly its completion prompt, and its EOS is the
token that ends an answer (``</s>``, ``<|im_end|>``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from deltaserve.plugins.families import family_of
from deltaserve.tuning.base import tokenizer as _tok
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


@dataclass(frozen=True)
class TinyQwen2VLConfig:
    """Sizes of the tiny Qwen2-VL base."""

    image_size: int = 32
    """The size the tests and the synthetic world use; other sizes within min/max pixels are accepted."""
    patch_size: int = 8
    merge_size: int = 2
    """merge_size × merge_size patches become one image token."""
    temporal_patch_size: int = 2
    min_pixels: int = 32 * 32
    max_pixels: int = 64 * 64
    """Images are resized to a multiple of patch_size × merge_size within [min_pixels, max_pixels]."""
    vision_hidden: int = 64
    vision_layers: int = 2
    vision_heads: int = 2
    vision_mlp_ratio: int = 2
    text_hidden: int = 128
    text_intermediate: int = 384
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 2
    mrope_section: tuple[int, int, int] = (4, 6, 6)
    """Rotary frequencies for (time, height, width) positions; sums to head_dim / 2."""
    max_positions: int = 512
    initializer_range: float = 0.3
    """Wide on purpose, as for LLaVA: greedy outputs must differ across prompts."""

    @property
    def image_tokens(self) -> int:
        """Image tokens of an image_size × image_size image."""
        return (self.image_size // (self.patch_size * self.merge_size)) ** 2


def qwen2_vl_hf_config(cfg: TinyQwen2VLConfig, tokenizer):
    from transformers import Qwen2VLConfig

    ids = tokenizer.convert_tokens_to_ids
    return Qwen2VLConfig(
        text_config={
            "hidden_size": cfg.text_hidden,
            "intermediate_size": cfg.text_intermediate,
            "num_hidden_layers": cfg.text_layers,
            "num_attention_heads": cfg.text_heads,
            "num_key_value_heads": cfg.text_kv_heads,
            "vocab_size": len(tokenizer),
            "max_position_embeddings": cfg.max_positions,
            "initializer_range": cfg.initializer_range,
            "rope_scaling": {"type": "mrope", "mrope_section": list(cfg.mrope_section)},
            "bos_token_id": None,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
        },
        vision_config={
            "depth": cfg.vision_layers,
            "embed_dim": cfg.vision_hidden,
            "hidden_size": cfg.text_hidden,  # the merger's output: the decoder's width
            "num_heads": cfg.vision_heads,
            "mlp_ratio": cfg.vision_mlp_ratio,
            "patch_size": cfg.patch_size,
            "spatial_merge_size": cfg.merge_size,
            "temporal_patch_size": cfg.temporal_patch_size,
            "initializer_range": cfg.initializer_range,
        },
        image_token_id=ids(_tok.IMAGE_PAD),
        video_token_id=ids(_tok.VIDEO_PAD),
        vision_start_token_id=ids(_tok.VISION_START),
        vision_end_token_id=ids(_tok.VISION_END),
        tie_word_embeddings=False,
        initializer_range=cfg.initializer_range,
    )


def build_qwen2_vl_processor(cfg: TinyQwen2VLConfig, tokenizer):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    sizes = {
        "min_pixels": cfg.min_pixels,
        "max_pixels": cfg.max_pixels,
        "patch_size": cfg.patch_size,
        "merge_size": cfg.merge_size,
        "temporal_patch_size": cfg.temporal_patch_size,
    }
    return Qwen2VLProcessor(  # transformers refuses a Qwen2-VL processor without its video processor
        image_processor=Qwen2VLImageProcessor(**sizes),
        video_processor=Qwen2VLVideoProcessor(**sizes),
        tokenizer=tokenizer,
        chat_template=_tok.QWEN_CHAT_TEMPLATE,
    )


def init_qwen2_vl_model(cfg: TinyQwen2VLConfig, tokenizer, seed: int):
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(qwen2_vl_hf_config(cfg, tokenizer))
    return model.float().eval()


_PROMPTS = {
    "llava": (_tok.PROMPT_FORMAT, f"{IMAGE}\n"),
    "qwen2_vl": (_tok.QWEN_PROMPT_FORMAT, _tok.QWEN_IMAGE),
}


def format_prompt(question: str, image: bool = False, model_type: str = "llava") -> str:
    """The completion prompt of one question (with the image placeholder when ``image``) for a base whose
    ``config.json`` has this ``model_type``: the training prompt format, and what the base's chat template
    renders for a one-turn chat. The LLaVA tokenizer adds the BOS on encode; Qwen2-VL has none."""
    if model_type not in _PROMPTS:
        raise ValueError(f"no prompt format for model_type `{model_type}` (known: {', '.join(_PROMPTS)})")
    fmt, placeholder = _PROMPTS[model_type]
    return fmt.format(image=placeholder if image else "", question=question)


def _checkpoint_name(model_type: str, name: str) -> str:
    return family_of({"model_type": model_type}).to_checkpoint(name)


def save_model_dir(model, tokenizer, processor, out: Path, extra_meta: dict | None = None) -> None:
    """Write config, Hub-layout safetensors, tokenizer and processor into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    model_type = model.config.model_type
    tensors = {_checkpoint_name(model_type, k): v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(dict(sorted(tensors.items())), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["architectures"] = [type(model).__name__]
    config.pop("transformers_version", None)
    _write_json(out / "config.json", config)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    _write_json(out / "generation_config.json", {k: v for k, v in special.items() if v is not None})
    processor.save_pretrained(str(out))
    for name in (
        "tokenizer_config.json",
        "processor_config.json",
        "preprocessor_config.json",
        "video_preprocessor_config.json",
    ):
        path = out / name
        if path.exists():  # re-write with sorted keys: byte-identical across runs
            _write_json(path, json.loads(path.read_text()))
    _write_json(out / "deltaserve-base.json", {"format_version": 1, **(extra_meta or {})})


def build_base(
    out: Path, seed: int = 0, cfg: TinyBaseConfig | TinyQwen2VLConfig | None = None, arch: str = "llava"
) -> Path:
    """Build a tiny random-init base of ``arch`` (one of :data:`ARCHS`) into ``out`` (created). Returns ``out``.

    ``cfg`` is the arch's sizes (:class:`TinyBaseConfig` for llava, :class:`TinyQwen2VLConfig` for qwen2_vl;
    default: the defaults). ``deltaserve-base.json`` records seed, sizes and stage, and for every arch but the
    default llava (whose files stay as they were) the arch.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch `{arch}` (known: {', '.join(ARCHS)})")
    cfg = cfg or _SIZES[arch]()
    if arch_of(cfg) != arch:
        raise TypeError(f"arch {arch} takes a {_SIZES[arch].__name__}, not {type(cfg).__name__}")
    tokenizer, processor, model = init_base(cfg, seed)
    meta = {"seed": seed, "sizes": asdict(cfg), "stage": "random-init"}
    if arch != "llava":
        meta = {"arch": arch, **meta}
    save_model_dir(model, tokenizer, processor, Path(out), meta)
    return Path(out)


def arch_of(cfg: TinyBaseConfig | TinyQwen2VLConfig) -> str:
    """The architecture a sizes object describes (one of :data:`ARCHS`)."""
    for arch, sizes in _SIZES.items():
        if type(cfg) is sizes:
            return arch
    raise TypeError(f"not a tiny-base sizes object: {type(cfg).__name__}")


def init_base(cfg: TinyBaseConfig | TinyQwen2VLConfig, seed: int):
    """``(tokenizer, processor, model)`` of a tiny random-init base with sizes ``cfg`` (its class picks the arch)."""
    if arch_of(cfg) == "llava":
        tokenizer = build_tokenizer()
        return tokenizer, build_processor(cfg, tokenizer), init_model(cfg, tokenizer, seed)
    tokenizer = _tok.build_qwen2_vl_tokenizer()
    return tokenizer, build_qwen2_vl_processor(cfg, tokenizer), init_qwen2_vl_model(cfg, tokenizer, seed)


_SIZES = {"llava": TinyBaseConfig, "qwen2_vl": TinyQwen2VLConfig}
ARCHS = tuple(_SIZES)
"""``build_base(arch=…)`` values (== the written ``config.json``'s ``model_type``)."""


def default_sizes(arch: str) -> TinyBaseConfig | TinyQwen2VLConfig:
    """The default sizes of ``arch``'s tiny base (their class picks the architecture)."""
    return _SIZES[arch]()


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
