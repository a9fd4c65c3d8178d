"""Byte-level BPE tokenizers for the tiny bases, trained deterministically on a built-in corpus.

Byte-level: the 256 byte symbols are always in the vocabulary, so any UTF-8 text
encodes (nothing maps to an unknown token) and decodes back exactly. The merges
are learned from a small fixed corpus of the words the synthetic world uses
(shapes, colours, places, numbers, question words), so the world's text is short
in tokens; everything else falls back to bytes.

Two flavours share the corpus and the training: the LLaVA base's (:func:`build_tokenizer`: ``<s>`` BOS
added on encode, ``</s>`` EOS, ``<image>``) and the Qwen2-VL base's (:func:`build_qwen2_vl_tokenizer`:
Qwen's special tokens, no BOS, ``<|im_end|>`` ends every turn and is the EOS).
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD, IMAGE = "<s>", "</s>", "<pad>", "<image>"
SPECIAL_TOKENS = [BOS, EOS, PAD, IMAGE]  # ids 0..3, in this order

# One user turn, then the answer. The chat template and the training data use this
# same format, so `/v1/completions` with this prompt and a one-turn chat are equivalent.
PROMPT_FORMAT = "{image}{question}\nAnswer:"
CHAT_TEMPLATE = (
    # The template carries BOS, as Llama's does: OpenAI-compatible servers (vLLM's, deltaserve)
    # and transformers' apply_chat_template(tokenize=True) tokenize the rendered chat *without*
    # adding special tokens, so the model sees exactly the training prompt `<s>…\nAnswer:`.
    "{{ bos_token }}"
    # Newlines are emitted as expressions: `{%-`/`-%}` would strip literal ones.
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{ '<image>\\n' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}{{ '\\nAnswer:' }}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{ ' ' + (message['content'] if message['content'] is string else message['content'][0]['text']) + '</s>\\n' }}"
    "{%- elif message['role'] == 'system' -%}"
    "{{ (message['content'] if message['content'] is string else message['content'][0]['text']) + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)

# ---- Qwen2-VL flavour -------------------------------------------------------------------
QWEN_ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
QWEN_SPECIAL_TOKENS = [QWEN_ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]  # ids 0..6
QWEN_IMAGE = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
"""The image placeholder of a Qwen2-VL prompt (the processor / vLLM expand ``<|image_pad|>`` to the image's tokens)."""

# Qwen's chat layout, one user turn, then the answer. As for LLaVA the completion prompt and a one-turn chat
# are the same tokens; unlike Qwen's own template there is no default system turn.
QWEN_PROMPT_FORMAT = IM_START + "user\n{image}{question}" + IM_END + "\n" + IM_START + "assistant\n"
QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' or part['type'] == 'image_url' -%}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'video' -%}{{ '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)

_WORDS = """
the a an is are of in on at to and or with what which where how many much there this that it its
image picture scene shape shapes object objects colour color colours left right top bottom middle
center centre corner upper lower above below next beside near far between
red green blue yellow purple orange white black gray grey pink brown cyan
circle square triangle cross ring dot bar diamond star
zero one two three four five six seven eight nine ten eleven twelve
0 1 2 3 4 5 6 7 8 9 10 11 12 plus minus times equals sum
digit number count answer question describe name list say tell give write spell word words
yes no true false big small large tiny first last only both each every none
opposite reverse backwards letter letters sentence caption
circles squares triangles crosses part locate relative direction seen from does have
add subtract equals compute read written here handwritten handwriting show shown
hot cold up down open closed fast slow old new day night out more less light dark high low
long short early late happy sad wet dry full empty hard soft
""".split()


def _corpus() -> list[str]:
    # Repetition gives the frequent words their merges; sorted input keeps training deterministic.
    lines = [" ".join(_WORDS[i : i + 8]) for i in range(0, len(_WORDS), 8)]
    lines += [f" {w}" for w in _WORDS] * 4 + [f"{w.capitalize()}" for w in _WORDS]
    lines += ["Answer: yes.", "What colour is the circle?", "How many shapes are there?"]
    return sorted(lines)


def _train(special_tokens: list[str], vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the LLaVA base's tokenizer. Deterministic: the same code gives byte-identical files."""
    tok = _train(SPECIAL_TOKENS, vocab_size)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens={"image_token": IMAGE},
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def build_qwen2_vl_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the Qwen2-VL base's tokenizer: the same corpus and BPE, Qwen's special tokens, no BOS (as Qwen's),
    EOS ``<|im_end|>`` (the token the chat template ends turns with), pad ``<|endoftext|>``. Deterministic."""
    tok = _train(QWEN_SPECIAL_TOKENS, vocab_size)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=QWEN_ENDOFTEXT,
        extra_special_tokens={"image_token": IMAGE_PAD, "video_token": VIDEO_PAD},
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = QWEN_CHAT_TEMPLATE
    return fast
