"""Reference generation helpers shared by the tests (import as ``from helpers import …``)."""

from __future__ import annotations

from deltaserve.tuning.synthetic import (  # noqa: F401 (re-exported for the tests)
    SPARSE_PARAMS,
    make_bottleneck_bundle,
    make_lora_bundle,
    make_peft_adapter,
    make_sparse_bundle,
)


TUNED_TOKENS = 8
"""Tokens asked of the tuned-delta fixtures (``min_tokens`` too: the one-digit experts would stop after one)."""

IA3_NAME = "ia3-task"
"""Task name of the IA³ delta the server tests register (the third-party kind in ``tests/kinds``)."""

PROMPTS = [
    "What colour is the circle?",
    "How many shapes are there?",
    "Describe the image.",
    "Where is the square?",
]


def image_prompt(question: str, model_type: str = "llava") -> str:
    """The completion prompt of ``question`` about one image, for a base of this ``config.model_type``."""
    from deltaserve.tuning.base.factory import format_prompt

    return format_prompt(question, image=True, model_type=model_type)


def hf_greedy(
    model, processor, prompt: str, image=None, max_new_tokens: int = 12, min_new_tokens: int = 0
) -> list[int]:
    """Reference greedy generation with transformers, one prompt at a time (no padding).

    Returns the generated token ids up to and including the first EOS, the way vLLM
    reports them.
    """
    import torch

    inputs = (
        processor(images=image, text=prompt, return_tensors="pt")
        if image is not None
        else processor(text=prompt, return_tensors="pt")
    )
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=False)
    ids = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = processor.tokenizer.eos_token_id
    return ids[: ids.index(eos) + 1] if eos in ids else ids


async def vllm_greedy(
    engine, prompt: str, image=None, max_tokens: int = 12, lora=None, request_id: str = "t"
) -> list[int]:
    from deltaserve.server.engine import GenerationInput, Sampling

    ids = engine.tokenizer(prompt).input_ids
    out: list[int] = []
    async for chunk in engine.generate(
        GenerationInput(request_id, ids, Sampling(max_tokens=max_tokens, temperature=0.0), image=image, lora=lora)
    ):
        out += chunk.token_ids
    return out


def hf_model_of(base_dir):
    """The base as a float32 transformers model of its family's class (LLaVA, Qwen2-VL, …), in eval mode."""
    import torch

    from deltaserve.plugins.base_spec import BaseSpec

    cls = BaseSpec.from_dir(base_dir).family.model_cls()
    return cls.from_pretrained(str(base_dir), dtype=torch.float32).eval()


def peft_model(base_dir, bundle_dir):
    """transformers base + PEFT adapter from a lora bundle (the reference for LoRA outputs)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model_of(base_dir), str(bundle_dir)).eval()


def png_bytes(image) -> bytes:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def plugin_model(base_dir, bundle_dir):
    """transformers base with a bundle applied through its delta-kind plugin (the reference
    for sparse and bottleneck outputs)."""
    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import read_bundle
    from deltaserve.plugins.registry import get_kind

    model = hf_model_of(base_dir)
    bundle = read_bundle(bundle_dir, BaseSpec.from_dir(base_dir))
    get_kind(bundle.manifest.kind)().apply(model, bundle)
    return model


class FakeEngine:
    """The engine as the registry and the service use it, for engine-free tests of *their* logic:
    LoRA adapters are accepted and listed, never computed with. With ``base_dir`` it also has
    the base's tokenizer and config, which is what request validation needs."""

    model_name = "tiny-llava"

    def __init__(self, base_dir=None):
        from types import SimpleNamespace

        self.config = SimpleNamespace(enable_lora=True, model=str(base_dir) if base_dir is not None else None)
        self.errored = False
        self.loras: set[int] = set()
        if base_dir is not None:
            from transformers import AutoConfig, AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
            self.hf_config = AutoConfig.from_pretrained(str(base_dir))
            self.max_model_len = self.hf_config.text_config.max_position_embeddings

    async def add_lora(self, request):
        self.loras.add(request.lora_int_id)
        return True

    async def remove_lora(self, lora_id):
        self.loras.discard(lora_id)
        return True

    async def list_loras(self) -> set[int]:
        return set(self.loras)

    async def reset_prefix_cache(self):
        return None


def concurrent_greedy(
    server, tasks: list[str], images: list, requests: int, tokens: int = TUNED_TOKENS, model_type: str = "llava"
) -> list[tuple]:
    """``requests`` concurrent greedy gRPC requests spread over ``tasks`` (``"base"``: the server's base) and
    ``PROMPTS`` with their ``images`` (PNG bytes), each asking exactly ``tokens`` tokens, in the prompt format of
    a base of ``model_type``. Returns (task, prompt index, token ids — or the exception, which then counts as a
    wrong answer)."""
    import asyncio

    from deltaserve.client.aio import AsyncDeltaClient

    async def load():
        async with AsyncDeltaClient(server.grpc) as client:

            async def one(task, i):
                try:
                    out = await client.generate(
                        image_prompt(PROMPTS[i], model_type),
                        image=images[i],
                        task=server.base_name if task == "base" else task,
                        max_tokens=tokens,
                        min_tokens=tokens,
                        temperature=0,
                    )
                    return task, i, out.token_ids
                except Exception as exc:  # every failure counts against the caller's check
                    return task, i, exc

            jobs = [(tasks[k % len(tasks)], (k // len(tasks)) % len(PROMPTS)) for k in range(requests)]
            return await asyncio.gather(*(one(t, i) for t, i in jobs))

    return asyncio.run(load())
