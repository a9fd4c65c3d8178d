"""Chat prompts are tokenized as vLLM's OpenAI server and transformers do: the template carries BOS, nothing is added.

Engine-free: :func:`deltaserve.server.requests.prepare` against the tokenizer's own
``apply_chat_template(tokenize=True)`` — what vLLM's ``/v1/chat/completions`` feeds the
engine (it renders the template and tokenizes with ``add_special_tokens=False``).
"""

from __future__ import annotations

import pytest
from helpers import png_bytes
from PIL import Image

from deltaserve.server.config import EngineConfig, ServeConfig
from deltaserve.server.requests import InferenceRequest, prepare

TEXT = [{"role": "user", "content": "What is the opposite of hot?"}]
IMAGE = [
    {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": "data:,"}},
            {"type": "text", "text": "Describe the image."},
        ],
    }
]
MULTI = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "And three plus three?"},
]


@pytest.fixture(scope="module")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))


def _prepare(tokenizer, tmp_path, **request):
    config = ServeConfig(engine=EngineConfig(model=str(tmp_path)), store=tmp_path)
    return prepare(
        InferenceRequest(**request), tokenizer=tokenizer, max_model_len=512, image_tokens=lambda h, w: 16, config=config
    )


@pytest.mark.parametrize("messages", [TEXT, IMAGE, MULTI], ids=["text", "one-image", "multi-turn"])
def test_chat_prompt_ids_equal_transformers_apply_chat_template(tokenizer, tmp_path, messages):
    image = png_bytes(Image.new("RGB", (32, 32), (200, 30, 30))) if messages is IMAGE else None
    ours = _prepare(tokenizer, tmp_path, messages=messages, image=image).prompt_token_ids
    reference = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
        "input_ids"
    ]
    assert ours == list(reference)
    assert ours[0] == tokenizer.bos_token_id and ours.count(tokenizer.bos_token_id) == 1


def test_one_turn_chat_equals_the_raw_training_prompt(tokenizer, tmp_path):
    """A one-turn chat (gRPC ``chat=True``, with an image) is the prompt the base was trained on, BOS included."""
    image = png_bytes(Image.new("RGB", (32, 32), (20, 30, 200)))
    chat = _prepare(tokenizer, tmp_path, prompt="Describe the image.", chat=True, image=image).prompt_token_ids
    raw = _prepare(tokenizer, tmp_path, prompt="<image>\nDescribe the image.\nAnswer:", image=image).prompt_token_ids
    assert chat == raw == tokenizer("<image>\nDescribe the image.\nAnswer:").input_ids
