"""Deltas made by ``deltaserve tune`` share one batch: base, two LoRA, two sparse and one bottleneck delta.

The deltas are what the tuning pipeline writes with its defaults (SPIDER and magnitude
masks over the projector and the last two decoder layers — RMSNorm weights included;
LoRA on every linear of that scope, fused ``qkv``/``gate_up`` in vLLM; bottleneck relu
adapters on ``o_proj`` and ``down_proj``), trained briefly on the tiny world's ``digits``
so that each one's answers differ from the base's. The tuned experts answer a digit and stop,
so every request asks for exactly ``MAX_TOKENS`` tokens (``min_tokens``; transformers:
``min_new_tokens``) to compare more than one token. 330 concurrent requests, equal shares,
each equal token for token to its expert in transformers (PEFT for LoRA; the sparse delta
merged into the weights; the adapters hooked on), so to its expert served alone.
"""

from __future__ import annotations

import asyncio

import pytest

from helpers import PROMPTS, hf_greedy, image_prompt, peft_model, plugin_model, png_bytes
from server_process import ADMIN_TOKEN

MAX_TOKENS = 8
METHODS = {"t-spider": ("spider", 0), "t-magnitude": ("magnitude", 0), "t-lora-a": ("lora", 1), "t-lora-b": ("lora", 2)}
METHODS["t-bottleneck"] = ("bottleneck", 0)


@pytest.fixture(scope="module")
def tuned(tiny_base, tmp_path_factory):
    from deltaserve.tuning.tune import TuneConfig, tune
    from deltaserve.tuning.world import WorldConfig, build_world

    root = tmp_path_factory.mktemp("tuned")
    world = build_world(root / "world", WorldConfig(downstream_train=96, val=4, test=4), tasks=("digits",))
    out = {}
    for name, (method, seed) in METHODS.items():
        config = TuneConfig(steps=30, batch_size=8, examples=3, seed=seed, eval_limit=4)
        result = tune(
            tiny_base, world["digits"], method, root / name, config, name=name, evaluate_general=False, progress=False
        )
        out[name] = result.path
    return out


@pytest.fixture(scope="module")
def refs(tiny_base, hf_processor, sample_images, tuned):
    import torch
    from transformers import LlavaForConditionalGeneration

    models = {"base": LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()}
    for name, path in tuned.items():
        models[name] = peft_model(tiny_base, path) if METHODS[name][0] == "lora" else plugin_model(tiny_base, path)
    out = {
        name: [
            hf_greedy(m, hf_processor, image_prompt(q), sample_images[i], MAX_TOKENS, MAX_TOKENS)
            for i, q in enumerate(PROMPTS)
        ]
        for name, m in models.items()
    }
    for name, outputs in out.items():  # non-degenerate: distinct across prompts, and not the base's answers
        assert len({tuple(o) for o in outputs}) == len(outputs), (name, outputs)
        assert name == "base" or outputs != out["base"], f"{name} gives the base's outputs"
    return out


def test_tuned_deltas_of_every_kind_share_the_batch_exactly(server, tuned, refs, sample_images):
    from deltaserve.client.aio import AsyncDeltaClient
    from deltaserve.client.sync import DeltaClient

    with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
        infos = {name: admin.register(path) for name, path in tuned.items()}
    try:
        assert {n: i.binding for n, i in infos.items()} == dict.fromkeys(tuned, "concurrent")
        images = [png_bytes(img) for img in sample_images[: len(PROMPTS)]]
        tasks = ["base", *tuned]

        async def load():
            async with AsyncDeltaClient(server.grpc) as client:

                async def one(task, i):
                    try:
                        out = await client.generate(
                            image_prompt(PROMPTS[i]),
                            image=images[i],
                            task=server.base_name if task == "base" else task,
                            max_tokens=MAX_TOKENS,
                            min_tokens=MAX_TOKENS,
                            temperature=0,
                        )
                        return task, i, out.token_ids
                    except Exception as exc:  # every failure counts against the test
                        return task, i, exc

                jobs = [(tasks[k % len(tasks)], (k // len(tasks)) % len(PROMPTS)) for k in range(330)]
                return await asyncio.gather(*(one(t, i) for t, i in jobs))

        results = asyncio.run(load())
        wrong = [(t, i, got) for t, i, got in results if got != refs[t][i]]
        assert not wrong, f"{len(wrong)} of {len(results)} differ, e.g. {wrong[:3]}"
    finally:
        with DeltaClient(server.grpc, admin_token=ADMIN_TOKEN) as admin:
            for name in tuned:
                admin.unregister(name)
