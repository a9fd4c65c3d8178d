"""Reference generation helpers shared by the tests (import as ``from helpers import …``)."""

from __future__ import annotations


PROMPTS = [
    "What colour is the circle?",
    "How many shapes are there?",
    "Describe the image.",
    "Where is the square?",
]


def image_prompt(question: str) -> str:
    from deltaserve.tuning.base.tokenizer import PROMPT_FORMAT

    return PROMPT_FORMAT.format(image="<image>\n", question=question)


def hf_greedy(model, processor, prompt: str, image=None, max_new_tokens: int = 12) -> list[int]:
    """Reference greedy generation with transformers, one prompt at a time (no padding).

    Returns the generated token ids up to and including the first EOS, the way vLLM
    reports them.
    """
    import torch

    inputs = processor(images=image, text=prompt, return_tensors="pt") if image is not None else processor(text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


async def vllm_greedy(engine, prompt: str, image=None, max_tokens: int = 12, lora=None, request_id: str = "t") -> list[int]:
    from deltaserve.server.engine import GenerationInput, Sampling

    ids = engine.tokenizer(prompt).input_ids
    out: list[int] = []
    async for chunk in engine.generate(GenerationInput(request_id, ids, Sampling(max_tokens=max_tokens, temperature=0.0), image=image, lora=lora)):
        out += chunk.token_ids
    return out


def make_peft_adapter(base_dir, out_dir, seed: int, r: int = 8, targets: str = "q_proj|v_proj|o_proj|down_proj"):
    """A plain PEFT LoRA adapter directory on the language model, with non-zero B (PEFT's default init is a no-op)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=rf".*language_model.*\.({targets})", init_lora_weights=False)
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
            adapter, out_dir, name=name, base=BaseSpec.from_dir(base_dir), description=description or f"test task {name}", examples=examples
        )


def peft_model(base_dir, bundle_dir):
    """transformers base + PEFT adapter from a lora bundle (the reference for LoRA outputs)."""
    import torch
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    return PeftModel.from_pretrained(base, str(bundle_dir)).eval()


def png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# Parameters a test sparse delta touches: fused shards (k_proj inside qkv_proj, up_proj inside
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


def make_sparse_bundle(base_dir, out_dir, name: str, seed: int, params=SPARSE_PARAMS, density: float = 0.1, scale: float = 0.6, description: str = "", examples=()):
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
        out_dir, name=name, base=base, deltas=deltas, task=_task_info(name, description, examples), method=MethodInfo("test", {"seed": seed})
    )


def make_bottleneck_bundle(base_dir, out_dir, name: str, seed: int, layers=(0, 1, 2, 3), dim: int = 8, description: str = "", examples=()):
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
        out_dir, name=name, base=base, adapters=adapters, task=_task_info(name, description, examples), method=MethodInfo("test", {"seed": seed})
    )


def plugin_model(base_dir, bundle_dir):
    """transformers base with a bundle applied through its delta-kind plugin (the reference
    for sparse and bottleneck outputs)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import read_bundle
    from deltaserve.plugins.registry import get_kind

    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    bundle = read_bundle(bundle_dir, BaseSpec.from_dir(base_dir))
    get_kind(bundle.manifest.kind)().apply(model, bundle)
    return model
