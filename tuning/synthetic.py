"""Synthetic deltas with random weights, for tests, benchmarks and demos of the serving path.

Shaped for the embedded tiny base (layer indices, widths). They exercise every code path
a tuned delta does (fused shards, padded vocabularies, the projector, the vision tower,
adapters on every layer) without a training run. A real delta comes from ``deltaserve tune``.
"""

from __future__ import annotations


# Parameters a synthetic sparse delta touches: fused shards (k_proj inside qkv_proj, up_proj inside
# gate_up_proj), plain linears, the projector (so encoder-cache reuse across states would
# show), the padded lm_head, and a vision-tower layer.
SPARSE_PARAMS = (
    "language_model.model.layers.2.self_attn.o_proj.weight",
    "language_model.model.layers.3.self_attn.k_proj.weight",
    "language_model.model.layers.2.mlp.up_proj.weight",
    "language_model.model.layers.3.mlp.down_proj.weight",
    "multi_modal_projector.linear_2.weight",
    "language_model.lm_head.weight",
    "vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight",
)


def _task_info(name: str, description: str, examples):
    from deltaserve.plugins.manifest import Example, TaskInfo

    return TaskInfo(description or f"test task {name}", [Example(text) for text in examples])


def make_sparse_bundle(
    base_dir,
    out_dir,
    name: str,
    seed: int,
    params=SPARSE_PARAMS,
    density: float = 0.1,
    scale: float = 0.6,
    description: str = "",
    examples=(),
):
    """A `sparse` bundle with random values at ``density`` of each parameter's coordinates."""
    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.manifest import MethodInfo
    from deltaserve.plugins.sparse import write_sparse_bundle

    base = BaseSpec.from_dir(base_dir)
    gen = torch.Generator().manual_seed(seed)
    deltas = {}
    for param in params:
        numel = torch.Size(base.params[param][0]).numel()
        indices = torch.randperm(numel, generator=gen)[: max(1, int(numel * density))].sort().values
        deltas[param] = (indices, torch.randn(indices.numel(), generator=gen) * scale)
    return write_sparse_bundle(
        out_dir,
        name=name,
        base=base,
        deltas=deltas,
        task=_task_info(name, description, examples),
        method=MethodInfo("test", {"seed": seed}),
    )


def make_bottleneck_bundle(
    base_dir, out_dir, name: str, seed: int, layers=(0, 1, 2, 3), dim: int = 8, description: str = "", examples=()
):
    """A `bottleneck` bundle on every decoder layer's ``down_proj`` with a non-zero ``up`` (a fresh adapter is the identity)."""
    import torch

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bottleneck import BottleneckAdapter, write_bottleneck_bundle
    from deltaserve.plugins.manifest import MethodInfo

    base = BaseSpec.from_dir(base_dir)
    gen = torch.Generator().manual_seed(seed)
    adapters = {}
    for layer in layers:
        adapter = BottleneckAdapter(128, dim, "gelu", scaling=2.0)
        torch.nn.init.normal_(adapter.down.weight, std=0.3, generator=gen)
        torch.nn.init.normal_(adapter.up.weight, std=0.5, generator=gen)
        torch.nn.init.normal_(adapter.down.bias, std=0.1, generator=gen)
        torch.nn.init.normal_(adapter.up.bias, std=0.1, generator=gen)
        adapters[f"language_model.model.layers.{layer}.mlp.down_proj"] = adapter
    return write_bottleneck_bundle(
        out_dir,
        name=name,
        base=base,
        adapters=adapters,
        task=_task_info(name, description, examples),
        method=MethodInfo("test", {"seed": seed}),
    )


def make_peft_adapter(base_dir, out_dir, seed: int, r: int = 8, targets: str = "q_proj|v_proj|o_proj|down_proj"):
    """A plain PEFT LoRA adapter directory on the language model, with non-zero B (PEFT's default init is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig

    from deltaserve.plugins.families import family_of

    torch.manual_seed(seed)
    model_cls = family_of(AutoConfig.from_pretrained(str(base_dir))).model_cls()
    model = model_cls.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=rf".*language_model.*\.({targets})", init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(str(out_dir))
    return out_dir


def make_lora_bundle(base_dir, out_dir, name: str, seed: int, description: str = "", examples=()):
    """A `lora` delta bundle (via a PEFT adapter directory and ``import_peft_adapter``)."""
    import tempfile
    from pathlib import Path

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.lora import import_peft_adapter

    with tempfile.TemporaryDirectory() as tmp:
        adapter = make_peft_adapter(base_dir, Path(tmp) / "adapter", seed)
        return import_peft_adapter(
            adapter,
            out_dir,
            name=name,
            base=BaseSpec.from_dir(base_dir),
            description=description or f"test task {name}",
            examples=examples,
        )
