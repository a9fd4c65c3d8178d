"""vLLM (CPU) serves the tiny LLaVA base token-exactly like transformers, with and without LoRA."""

from __future__ import annotations

import pytest
import torch

from helpers import PROMPTS, hf_greedy, image_prompt, vllm_greedy


async def test_base_greedy_matches_transformers(engine, hf_model, hf_processor, sample_images):
    prompts = [image_prompt(q) for q in PROMPTS]
    ref = [hf_greedy(hf_model, hf_processor, p, img) for p, img in zip(prompts, sample_images)]
    # A model that says the same thing to everything would make the comparison vacuous.
    assert len({tuple(r) for r in ref}) == len(ref), f"reference outputs are not all different: {ref}"
    got = [await vllm_greedy(engine, p, img, request_id=f"base-{i}") for i, (p, img) in enumerate(zip(prompts, sample_images))]
    assert got == ref


async def test_text_only_prompt_matches_transformers(engine, hf_model, hf_processor):
    prompt = "What is the opposite of big?\nAnswer:"
    assert await vllm_greedy(engine, prompt) == hf_greedy(hf_model, hf_processor, prompt)


@pytest.fixture(scope="module")
def peft_adapter(tmp_path_factory, tiny_base):
    """A plain PEFT LoRA adapter on the language model with non-zero B (PEFT's default init is a no-op)."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(7)
    model = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=r".*language_model.*\.(q_proj|v_proj|o_proj|down_proj)",
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, config)
    out = tmp_path_factory.mktemp("peft") / "adapter"
    peft_model.save_pretrained(str(out))
    return out


async def test_lora_through_vllm_matches_peft(engine, tiny_base, hf_processor, sample_images, peft_adapter):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration
    from vllm.lora.request import LoRARequest

    base = LlavaForConditionalGeneration.from_pretrained(str(tiny_base), dtype=torch.float32).eval()
    prompts = [image_prompt(q) for q in PROMPTS]
    base_out = [hf_greedy(base, hf_processor, p, img) for p, img in zip(prompts, sample_images)]
    peft_model = PeftModel.from_pretrained(base, str(peft_adapter)).eval()
    ref = [hf_greedy(peft_model, hf_processor, p, img) for p, img in zip(prompts, sample_images)]
    assert len({tuple(r) for r in ref}) == len(ref), "LoRA outputs do not vary across prompts"
    assert all(r != b for r, b in zip(ref, base_out)), "the adapter does not change the outputs"

    lora = LoRARequest("peft-test", 1, str(peft_adapter))
    await engine.add_lora(lora)
    got = [await vllm_greedy(engine, p, img, lora=lora, request_id=f"lora-{i}") for i, (p, img) in enumerate(zip(prompts, sample_images))]
    assert got == ref
    # The same engine still serves the untouched base next to the adapter.
    assert await vllm_greedy(engine, prompts[0], sample_images[0], request_id="base-again") == base_out[0]
