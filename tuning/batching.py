"""From validated samples to model inputs: prompt format, one-time encoding, padding, batch streams.

Samples are encoded once with the base's processor (the image processor resizes and
normalises; the tokenizer expands ``<image>`` into the image tokens), then batches are
only padded views of those tensors — training never re-decodes an image.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from deltaserve.tuning.base.tokenizer import IMAGE, PROMPT_FORMAT
from deltaserve.tuning.data import Sample

IGNORE_INDEX = -100
"""Label of prompt and padding positions: the loss is on the target tokens only."""
_CHUNK = 256


def prompt_text(sample: Sample) -> str:
    """``"<image>\\nWhat colour is the circle?\\nAnswer:"`` (no image placeholder for text-only samples)."""
    return PROMPT_FORMAT.format(image=f"{IMAGE}\n" if sample.image is not None else "", question=sample.prompt)


def target_text(sample: Sample) -> str:
    """What follows the prompt: a space and the answer (the EOS token is appended as an id)."""
    return " " + sample.target


@dataclass(frozen=True)
class Encoded:
    """A sample as token ids and pixels. ``prompt_ids`` start with BOS and hold the expanded image tokens."""

    sample: Sample
    prompt_ids: list[int]
    target_ids: list[int]
    """The answer's tokens followed by EOS."""
    pixel_values: torch.Tensor | None
    """[3, H, W], normalised by the image processor; None for a text-only sample."""

    @property
    def task(self) -> str:
        return self.sample.task


def encode(processor, samples: list[Sample]) -> list[Encoded]:
    """Encode ``samples`` (order kept) with the base's processor, in chunks."""
    tokenizer = processor.tokenizer
    out: list[Encoded | None] = [None] * len(samples)
    for with_image in (True, False):
        indices = [i for i, s in enumerate(samples) if (s.image is not None) == with_image]
        for start in range(0, len(indices), _CHUNK):
            chunk = [samples[i] for i in indices[start : start + _CHUNK]]
            texts = [prompt_text(s) for s in chunk]
            if with_image:
                enc = processor(text=texts, images=[s.load_image() for s in chunk], padding=False)
                pixels = list(enc["pixel_values"])
            else:
                enc = processor(text=texts, padding=False)
                pixels = [None] * len(chunk)
            targets = tokenizer([target_text(s) for s in chunk], add_special_tokens=False)["input_ids"]
            for j, sample in enumerate(chunk):
                pv = None if pixels[j] is None else torch.as_tensor(pixels[j], dtype=torch.float32)
                out[indices[start + j]] = Encoded(
                    sample, list(enc["input_ids"][j]), list(targets[j]) + [tokenizer.eos_token_id], pv
                )
    return out  # type: ignore[return-value]


def collate(items: list[Encoded], pad_id: int, with_targets: bool = True) -> dict[str, torch.Tensor]:
    """Pad a batch. Training (``with_targets``): prompt + target, padded right, labels on the target only.

    Generation (``with_targets=False``): prompts only, padded left so every row ends where generation starts.
    """
    rows = [e.prompt_ids + e.target_ids if with_targets else e.prompt_ids for e in items]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [batch, seq]
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (row, item) in enumerate(zip(rows, items)):
        if with_targets:
            input_ids[i, : len(row)] = torch.tensor(row)
            attention_mask[i, : len(row)] = 1
            labels[i, len(item.prompt_ids) : len(row)] = torch.tensor(item.target_ids)
        else:
            input_ids[i, width - len(row) :] = torch.tensor(row)
            attention_mask[i, width - len(row) :] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_targets:
        batch["labels"] = labels
    pixels = [e.pixel_values for e in items if e.pixel_values is not None]
    if pixels:
        batch["pixel_values"] = torch.stack(pixels)  # [images, 3, H, W], in row order
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
