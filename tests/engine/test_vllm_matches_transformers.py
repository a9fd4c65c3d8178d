"""vLLM (CPU) serves the tiny LLaVA base token-exactly like transformers, with and without LoRA."""

from __future__ import annotations

import pytest
import torch

from helpers import PROMPTS, hf_greedy, image_prompt, make_lora_bundle, peft_model, vllm_greedy


async def test_base_greedy_matches_transformers(engine, hf_model, hf_processor, sample_images):
    prompts = [image_prompt(q) for q in PROMPTS]
    ref = [hf_greedy(hf_model, hf_processor, p, img) for p, img in zip(prompts, sample_images)]
    # A model that says the same thing to everything would make the comparison vacuous.
    assert len({tuple(r) for r in ref}) == len(ref), f"reference outputs are not all different: {ref}"
    got = [
        await vllm_greedy(engine, p, img, request_id=f"base-{i}")
        for i, (p, img) in enumerate(zip(prompts, sample_images))
    ]
    assert got == ref


async def test_text_only_prompt_matches_transformers(engine, hf_model, hf_processor):
    prompt = "What is the opposite of big?\nAnswer:"
    assert await vllm_greedy(engine, prompt) == hf_greedy(hf_model, hf_processor, prompt)


@pytest.fixture(scope="module")
def lora_bundle(tmp_path_factory, tiny_base):
    """A `lora` delta bundle, made from a plain PEFT adapter directory."""
    return make_lora_bundle(tiny_base, tmp_path_factory.mktemp("lora") / "bundle", name="lora-test", seed=7)


async def test_lora_bundle_through_vllm_matches_peft(engine, tiny_base, hf_processor, sample_images, lora_bundle):
    from transformers import LlavaForConditionalGeneration
    from vllm.lora.request import LoRARequest

    from deltaserve.plugins.base_spec import BaseSpec
    from deltaserve.plugins.bundle import read_bundle

    read_bundle(lora_bundle, BaseSpec.from_dir(tiny_base))  # a valid bundle, and a PEFT directory at once
    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    prompts = [image_prompt(q) for q in PROMPTS]
    base_out = [hf_greedy(base, hf_processor, p, img) for p, img in zip(prompts, sample_images)]
    reference = peft_model(tiny_base, lora_bundle)
    ref = [hf_greedy(reference, hf_processor, p, img) for p, img in zip(prompts, sample_images)]
    assert len({tuple(r) for r in ref}) == len(ref), "LoRA outputs do not vary across prompts"
    assert all(r != b for r, b in zip(ref, base_out)), "the adapter does not change the outputs"

    lora = LoRARequest("lora-test", 1, str(lora_bundle))
    await engine.add_lora(lora)
    got = [
        await vllm_greedy(engine, p, img, lora=lora, request_id=f"lora-{i}")
        for i, (p, img) in enumerate(zip(prompts, sample_images))
    ]
    assert got == ref
    # The same engine still serves the untouched base next to the adapter.
    assert await vllm_greedy(engine, prompts[0], sample_images[0], request_id="base-again") == base_out[0]
