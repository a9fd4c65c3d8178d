"""Prompt augmentation for pretraining: reworded copies of the training samples.

The world's splits are disjoint by phrasing: a test prompt is worded in a way no training
sample is (:func:`deltaserve.tuning.world.spec.phrasings_of`). A tiny model trained on a
dozen fixed phrasings per task learns the phrasings, not the question, and answers a new
wording badly (general 0.856 before the phrasing split, 0.678 after, same recipe:
docs/base-ablation.md). Reworded copies teach it to read the *content words* — the colour,
shape, place, number or word the question is about, and the few words that tell plus from
minus — and to ignore the rest: each copy drops some other words, inserts unfamiliar ones
(byte-level pieces, as an unseen or foreign word is for the tiny tokenizer) and varies case
and punctuation. The answer never changes; only training prompts are touched.
"""

from __future__ import annotations

import random
import re
import string
from dataclasses import replace

from deltaserve.tuning.data import Sample
from deltaserve.tuning.world.scenes import COLOURS, NUMBER_WORDS, PLACES, SHAPES
from deltaserve.tuning.world.text import OPPOSITES

_WORD = re.compile(r"[\w+\-=]+|[^\w\s]", re.UNICODE)


OPERATION_WORDS = frozenset(
    {"plus", "+", "add", "sum", "total", "together", "more", "minus", "-", "moins", "subtract", "take", "away"}
    | {"difference", "eat", "left", "remains", "from", "to"}
)
"""What tells the arithmetic task's plus from its minus (and which number is taken from which)."""


def content_words() -> frozenset[str]:
    """Words a copy always keeps: the world's vocabulary and what tells plus from minus."""
    vocab = set(SHAPES) | {s + "s" for s in SHAPES} | set(COLOURS) | set(NUMBER_WORDS)
    vocab |= {w for place in PLACES for w in place.split()} | {w for pair in OPPOSITES for w in pair}
    return frozenset(vocab | OPERATION_WORDS | {"shape", "shapes"})


def _pseudo_word(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 8)))


def reword(prompt: str, rng: random.Random, keep: frozenset[str], drop: float = 0.25, insert: float = 0.5) -> str:
    """``prompt`` with non-content words dropped (each with probability ``drop``, never all of them),
    up to two unfamiliar words inserted (with probability ``insert``), and case / final punctuation varied."""
    tokens = _WORD.findall(prompt)
    kept = [t for t in tokens if t.lower() in keep or rng.random() >= drop]
    if not kept:
        kept = tokens
    if rng.random() < insert:
        for _ in range(rng.randint(1, 2)):
            kept.insert(rng.randint(0, len(kept)), _pseudo_word(rng))
    text = " ".join(kept)
    text = re.sub(r" ([^\w\s+\-=])", r"\1", text)  # "circle ?" -> "circle?"
    roll = rng.random()
    if roll < 0.25:
        text = text.lower()
    elif roll < 0.35:
        text = text.capitalize()
    if rng.random() < 0.3:
        text = text.rstrip(".?!").rstrip()
    return text or prompt


def augmented(samples: list[Sample], copies: int, seed: int, **kwargs) -> list[Sample]:
    """``copies`` reworded copies of every sample (ids suffixed ``~N``), seeded: the same call gives the same copies."""
    keep = content_words()
    rng = random.Random(f"deltaserve-augment\0{seed}")
    return [
        replace(s, id=f"{s.id}~{n}", prompt=reword(s.prompt, rng, keep, **kwargs))
        for n in range(1, copies + 1)
        for s in samples
    ]
