"""The chat template the README recipe installs into a LLaVA-1.5 checkpoint before ``deltaserve tune``.

``tuning/batching.py`` needs the assistant turn to end in the EOS token; this template renders LLaVA-1.5's own
conversation format (``USER: <image>\\n{question} ASSISTANT: {answer}</s>``, BOS first) and meets that
contract. Checked here on the tiny LLaVA base's processor (a Llama-style tokenizer with ``<s>``/``</s>``).
"""

from __future__ import annotations

from pathlib import Path

TEMPLATE = Path(__file__).resolve().parents[2] / "deploy" / "chat-templates" / "llava-1.5.jinja"


def test_llava_15_template_meets_the_tuners_contract(tiny_base):
    from transformers import AutoProcessor

    from deltaserve.tuning.batching import prompt_text, target_text
    from deltaserve.tuning.data import Sample

    processor = AutoProcessor.from_pretrained(str(tiny_base))
    processor.chat_template = TEMPLATE.read_text()
    with_image = Sample("a", "Which digit is written here?", "7", Path("x.png"), "digits")
    text_only = Sample("b", "What is 2 + 3?", "5", None, "arithmetic")
    assert prompt_text(processor, with_image) == "<s>USER: <image>\nWhich digit is written here? ASSISTANT:"
    assert target_text(processor, with_image) == " 7"
    assert prompt_text(processor, text_only) == "<s>USER: What is 2 + 3? ASSISTANT:"
    assert target_text(processor, text_only) == " 5"
