"""A byte-level BPE tokenizer for the tiny base, trained deterministically on a built-in corpus.

Byte-level: the 256 byte symbols are always in the vocabulary, so any UTF-8 text
encodes (nothing maps to an unknown token) and decodes back exactly. The merges
are learned from a small fixed corpus of the words the synthetic world uses
(shapes, colours, places, numbers, question words), so the world's text is short
in tokens; everything else falls back to bytes.
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


def build_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train the tokenizer. Deterministic: the same code gives byte-identical files."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
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
