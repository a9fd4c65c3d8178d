"""From validated samples to model inputs: prompt format, one-time encoding, padding, batch streams.

Architecture-neutral: the base's own processor and chat template say everything.

- The prompt is the base's chat template rendering a one-turn chat (image part, then the
  question) with the generation prompt; the answer is what the template renders for the
  assistant turn, up to the EOS token (which is appended as an id). The tiny bases' templates
  render exactly their completion prompts (:func:`deltaserve.tuning.base.factory.format_prompt`):
  LLaVA ``<s><image>\\nQ\\nAnswer:`` → `` 7</s>``; Qwen2-VL
  ``<|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>Q<|im_end|>\\n<|im_start|>assistant\\n``
  → ``7<|im_end|>``. The rendered text carries the template's BOS, so it is tokenised without
  adding special tokens (as OpenAI-compatible servers tokenise a rendered chat).
- An image sample is encoded by the processor alone (it resizes, normalises, and expands the
  image placeholder to the image's tokens). Whatever the processor returns besides ``input_ids``
  and ``attention_mask`` is kept: per-token sequences (e.g. Qwen2-VL's ``mm_token_type_ids``)
  are padded like the ids, per-image tensors (``pixel_values`` — LLaVA's ``[1, 3, H, W]``,
  Qwen2-VL's flattened patches ``[patches, dim]`` — and ``image_grid_thw``) are concatenated
  over the batch's images in row order, which is the layout each model's processor itself
  produces for a batch.

Samples are encoded once; batches are only padded views of those tensors — training never
re-decodes an image.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from deltaserve.tuning.data import Sample

IGNORE_INDEX = -100
"""Label of prompt and padding positions: the loss is on the target tokens only."""
_CHUNK = 256
_TEXT_KEYS = ("input_ids", "attention_mask")


def _user_turn(sample: Sample) -> list[dict]:
    content = [{"type": "image"}] if sample.image is not None else []
    return [{"role": "user", "content": [*content, {"type": "text", "text": sample.prompt}]}]


def prompt_text(processor, sample: Sample) -> str:
    """The base's chat template on the sample's one-turn chat, generation prompt added (its BOS included)."""
    return processor.apply_chat_template(_user_turn(sample), add_generation_prompt=True, tokenize=False)


def target_text(processor, sample: Sample) -> str:
    """What the base's chat template renders for the answer turn after :func:`prompt_text`, up to the EOS token
    (exclusive; the EOS is appended as an id): ``" 7"`` for the tiny LLaVA, ``"7"`` for the tiny Qwen2-VL."""
    prompt = prompt_text(processor, sample)
    chat = [*_user_turn(sample), {"role": "assistant", "content": sample.target}]
    full = processor.apply_chat_template(chat, tokenize=False)
    eos = processor.tokenizer.eos_token
    if not full.startswith(prompt) or eos not in full[len(prompt) :]:
        raise ValueError(
            "the base's chat template must render a one-turn chat as the generation prompt followed by the answer "
            f"and `{eos}`; it rendered {full!r}"
        )
    answer = full[len(prompt) :]
    return answer[: answer.index(eos)]


@dataclass(frozen=True)
class Encoded:
    """A sample as token ids and image inputs. ``prompt_ids`` carry the template's BOS (if any) and the expanded
    image tokens."""

    sample: Sample
    prompt_ids: list[int]
    target_ids: list[int]
    """The answer's tokens followed by EOS."""
    image_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """The processor's per-image tensors for this sample (first dimension: this image's rows); empty for text."""
    token_inputs: dict[str, list[int]] = field(default_factory=dict)
    """The processor's other per-prompt-token sequences (e.g. ``mm_token_type_ids``); targets and padding get 0."""

    @property
    def task(self) -> str:
        return self.sample.task

    @property
    def pixel_values(self) -> torch.Tensor | None:
        """This sample's ``pixel_values`` as the processor laid them out (None for a text-only sample)."""
        return self.image_inputs.get("pixel_values")


def encode(processor, samples: list[Sample]) -> list[Encoded]:
    """Encode ``samples`` (order kept) with the base's processor: text-only samples in chunks, image samples one
    by one (the processor lays out each image's tensors; no architecture's formula is needed to split them)."""
    tokenizer = processor.tokenizer
    out: list[Encoded | None] = [None] * len(samples)
    for start in range(0, len(samples), _CHUNK):
        chunk = samples[start : start + _CHUNK]
        targets = tokenizer([target_text(processor, s) for s in chunk], add_special_tokens=False)["input_ids"]
        text_only = [j for j, s in enumerate(chunk) if s.image is None]
        if text_only:
            enc = processor(
                text=[prompt_text(processor, chunk[j]) for j in text_only], add_special_tokens=False, padding=False
            )
            for row, j in enumerate(text_only):
                tokens = {k: [int(t) for t in v[row]] for k, v in enc.items() if k not in _TEXT_KEYS}
                out[start + j] = Encoded(
                    chunk[j], list(enc["input_ids"][row]), list(targets[j]) + [tokenizer.eos_token_id], {}, tokens
                )
        for j, sample in enumerate(chunk):
            if sample.image is None:
                continue
            enc = processor(
                text=[prompt_text(processor, sample)],
                images=[sample.load_image()],
                add_special_tokens=False,
                return_tensors="pt",
            )
            ids = enc["input_ids"]  # [1, prompt]
            tokens, images = {}, {}
            for key, value in enc.items():
                if key in _TEXT_KEYS:
                    continue
                if value.shape == ids.shape:  # per token
                    tokens[key] = value[0].tolist()
                else:  # this image's rows: [1, 3, H, W] pixels, [patches, dim] patches, [1, 3] grid, ...
                    images[key] = value.float() if value.is_floating_point() else value
            out[start + j] = Encoded(
                sample, ids[0].tolist(), list(targets[j]) + [tokenizer.eos_token_id], images, tokens
            )
    return out  # type: ignore[return-value]


def collate(items: list[Encoded], pad_id: int, with_targets: bool = True) -> dict[str, torch.Tensor]:
    """Pad a batch. Training (``with_targets``): prompt + target, padded right, labels on the target only.

    Generation (``with_targets=False``): prompts only, padded left so every row ends where generation starts.
    Per-token inputs are padded alike (0 on targets and padding); per-image inputs are concatenated in row order.
    """
    rows = [e.prompt_ids + e.target_ids if with_targets else e.prompt_ids for e in items]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    token_keys = sorted({k for e in items for k in e.token_inputs})
    token_inputs = {k: torch.zeros((len(rows), width), dtype=torch.long) for k in token_keys}
    for i, (row, item) in enumerate(zip(rows, items)):
        span = slice(0, len(row)) if with_targets else slice(width - len(row), width)
        input_ids[i, span] = torch.tensor(row)
        attention_mask[i, span] = 1
        if with_targets:
            labels[i, len(item.prompt_ids) : len(row)] = torch.tensor(item.target_ids)
        for k in token_keys:
            seq = item.token_inputs.get(k, [0] * len(item.prompt_ids))
            token_inputs[k][i, span.start : span.start + len(seq)] = torch.tensor(seq, dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_targets:
        batch["labels"] = labels
    batch.update(token_inputs)
    image_keys = sorted({k for e in items for k in e.image_inputs})
    for k in image_keys:  # e.g. pixel_values [images, 3, H, W] (LLaVA) or [patches, dim] (Qwen2-VL), in row order
        batch[k] = torch.cat([e.image_inputs[k] for e in items if k in e.image_inputs])
    return batch


class BatchStream:
    """Endless, seeded batches of encoded samples.

    Plain: shuffled epochs over all items. ``balance_tasks``: each slot first draws a task
    uniformly, then the next item of that task's own shuffled cycle — small tasks (the text
    facts) are seen as often as large ones.
    """

    def __init__(self, items: list[Encoded], batch_size: int, seed: int = 0, balance_tasks: bool = False):
        if not items:
            raise ValueError("no training samples")
        self.batch_size = batch_size
        self._rng = random.Random(seed)
        groups: dict[str, list[Encoded]] = {}
        for item in items:
            groups.setdefault(item.task if balance_tasks else "", []).append(item)
        self._tasks = sorted(groups)
        self._cycles = {t: _Cycle(groups[t], self._rng) for t in self._tasks}

    def __iter__(self) -> Iterator[list[Encoded]]:
        return self

    def __next__(self) -> list[Encoded]:
        if len(self._tasks) == 1:
            cycle = self._cycles[self._tasks[0]]
            return [cycle.next() for _ in range(self.batch_size)]
        return [self._cycles[self._rng.choice(self._tasks)].next() for _ in range(self.batch_size)]


class _Cycle:
    def __init__(self, items: list[Encoded], rng: random.Random):
        self._items, self._rng, self._order, self._pos = items, rng, [], 0

    def next(self) -> Encoded:
        if self._pos == len(self._order):
            self._order = list(range(len(self._items)))
            self._rng.shuffle(self._order)
            self._pos = 0
        self._pos += 1
        return self._items[self._order[self._pos - 1]]
