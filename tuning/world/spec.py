"""What a task generator is, and how splits are assigned.

Splits are disjoint by *content*: a scene (or a text fact-with-phrasing, or a
digit image) is assigned to train / val / test by a hash of its canonical key and
the world seed, so the same scene never appears in two splits of any task, even
rendered differently.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable
from dataclasses import dataclass

from PIL import Image

SPLITS = ("train", "val", "test")
VAL_FRACTION = 0.1
TEST_FRACTION = 0.1
HELD_OUT_PHRASING_FRACTION = 0.2
"""Share of a task's phrasings reserved for ``val`` and, as much again, for ``test``."""


@dataclass(frozen=True)
class RawSample:
    """One generated sample before it is written: the question, the answer, the image (or None)."""

    prompt: str
    target: str
    image: Image.Image | None = None


@dataclass(frozen=True)
class TaskSpec:
    """A generated task of the world."""

    name: str
    description: str
    type: str
    """``"general"`` (the base is pretrained on it) or ``"downstream"`` (the base never sees it)."""
    generate: Callable[[str, int, int], list[RawSample]]
    """``generate(split, n, seed)`` → up to ``n`` samples of ``split``, deterministic in its arguments."""
    metric: str = "exact_match"
    """How the task is scored (written to ``task.json``; see :data:`deltaserve.tuning.data.METRICS`)."""


def split_of(key: str, seed: int) -> str:
    """``"train"``, ``"val"`` or ``"test"`` for a canonical content key (about 80/10/10)."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < TEST_FRACTION:
        return "test"
    return "val" if u < TEST_FRACTION + VAL_FRACTION else "train"


def phrasings_of(task: str, phrasings: tuple[str, ...], split: str, seed: int) -> tuple[str, ...]:
    """The phrasings ``split`` may use: splits are disjoint by *phrasing* as well as by content.

    A seeded shuffle puts ``HELD_OUT_PHRASING_FRACTION`` of the phrasings (at least one) in
    ``test``, as many in ``val`` and the rest in ``train``: test prompts are worded in ways
    neither the tuned experts nor the router ever saw.
    """
    order = list(phrasings)
    random.Random(f"deltaserve-phrasings\0{task}\0{seed}").shuffle(order)
    k = max(1, round(len(order) * HELD_OUT_PHRASING_FRACTION))
    chosen = {"test": order[:k], "val": order[k : 2 * k], "train": order[2 * k :]}[split]
    return tuple(chosen)


def fill(template: str, **slots: str) -> str:
    """``template.format`` with every slot also offered capitalised under its capitalised name
    (``{A}`` for ``a``, ``{Ref}`` for ``ref``): for a slot at the start of a sentence."""
    upper = {k[:1].upper() + k[1:]: v[:1].upper() + v[1:] for k, v in slots.items()}
    return template.format(**slots, **upper)


def rng_for(task: str, split: str, seed: int) -> random.Random:
    """A private random stream per (task, split, seed): sizes of one task never shift another's samples."""
    return random.Random(f"deltaserve-world\0{task}\0{split}\0{seed}")
