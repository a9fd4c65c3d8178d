"""vLLM (CPU) serves the tiny Qwen2-VL base token-exactly like transformers (images and text only)."""

from __future__ import annotations

import pytest
import torch

from deltaserve.server.config import EngineConfig
from deltaserve.tuning.base.factory import TinyQwen2VLConfig, format_prompt
from helpers import PROMPTS, hf_greedy, image_prompt, vllm_greedy


@pytest.fixture(scope="module")
async def qwen_engine(tiny_qwen_base):
    from deltaserve.server.engine import Engine

    eng = await Engine.start(
        EngineConfig(model=str(tiny_qwen_base), max_loras=2, kv_cache_memory_bytes=128 * 1024 * 1024)
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def qwen_hf(tiny_qwen_base):
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    processor = AutoProcessor.from_pretrained(str(tiny_qwen_base))
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(tiny_qwen_base), dtype=torch.float32).eval()
    return model, processor


def test_a_32px_image_is_four_image_tokens(qwen_hf, sample_images):
    _, processor = qwen_hf
    inputs = processor(images=sample_images[0], text=image_prompt(PROMPTS[0], "qwen2_vl"), return_tensors="pt")
    assert inputs["image_grid_thw"].tolist() == [[1, 4, 4]]  # 4×4 patches of 8×8 pixels
    image_tokens = int((inputs["input_ids"] == processor.image_token_id).sum())
    assert image_tokens == TinyQwen2VLConfig().image_tokens == 4  # merged 2×2


def test_chat_template_renders_the_completion_prompt(qwen_hf):
    _, processor = qwen_hf
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[0]}]}]
    rendered = processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert rendered == image_prompt(PROMPTS[0], "qwen2_vl")
    assert processor.tokenizer.eos_token == "<|im_end|>"


async def test_base_greedy_matches_transformers(qwen_engine, qwen_hf, sample_images):
    model, processor = qwen_hf
    prompts = [image_prompt(q, "qwen2_vl") for q in PROMPTS]
    ref = [hf_greedy(model, processor, p, img) for p, img in zip(prompts, sample_images)]
    # A model that says the same thing to everything would make the comparison vacuous.
    assert len({tuple(r) for r in ref}) == len(ref), f"reference outputs are not all different: {ref}"
    got = [
        await vllm_greedy(qwen_engine, p, img, request_id=f"qwen-{i}")
        for i, (p, img) in enumerate(zip(prompts, sample_images))
    ]
    assert got == ref


async def test_text_only_prompt_matches_transformers(qwen_engine, qwen_hf):
    model, processor = qwen_hf
    prompt = format_prompt("What is the opposite of big?", image=False, model_type="qwen2_vl")
    assert await vllm_greedy(qwen_engine, prompt, request_id="qwen-text") == hf_greedy(model, processor, prompt)
