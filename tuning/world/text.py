"""Text-only general tasks: arithmetic in words and opposites.

These test *retained knowledge*: the facts are finite, so the splits hold out
(fact, phrasing) pairs — a test prompt's exact wording never occurs in training,
while the fact itself usually does under another phrasing. That is the kind of
general knowledge fine-tuning is known to erase.
"""

from __future__ import annotations

from deltaserve.tuning.world.scenes import NUMBER_WORDS
from deltaserve.tuning.world.spec import RawSample, TaskSpec, rng_for, split_of

PLUS_PROMPTS = ("What is {a} plus {b}?", "Add {a} and {b}.", "{A} plus {b} equals what?")
MINUS_PROMPTS = ("What is {a} minus {b}?", "Subtract {b} from {a}.", "{A} minus {b} equals what?")
OPPOSITE_PROMPTS = ("What is the opposite of {w}?", "Name the opposite of {w}.", "Give the word opposite to {w}.")
OPPOSITES = (
    ("big", "small"), ("hot", "cold"), ("up", "down"), ("left", "right"), ("top", "bottom"), ("yes", "no"),
    ("true", "false"), ("black", "white"), ("first", "last"), ("open", "closed"), ("fast", "slow"), ("old", "new"),
    ("day", "night"), ("in", "out"), ("above", "below"), ("more", "less"), ("light", "dark"), ("high", "low"),
    ("long", "short"), ("early", "late"), ("happy", "sad"), ("wet", "dry"), ("full", "empty"), ("hard", "soft"),
)  # fmt: skip


def _arithmetic_facts() -> list[tuple[str, str]]:
    facts = []
    for a in range(len(NUMBER_WORDS)):
        for b in range(len(NUMBER_WORDS)):
            wa, wb = NUMBER_WORDS[a], NUMBER_WORDS[b]
            if a + b < len(NUMBER_WORDS):
                facts += [(t.format(a=wa, b=wb, A=wa.capitalize()), NUMBER_WORDS[a + b]) for t in PLUS_PROMPTS]
            if a - b >= 0:
                facts += [(t.format(a=wa, b=wb, A=wa.capitalize()), NUMBER_WORDS[a - b]) for t in MINUS_PROMPTS]
    return facts


def _opposite_facts() -> list[tuple[str, str]]:
    pairs = list(OPPOSITES) + [(b, a) for a, b in OPPOSITES]
    return [(t.format(w=w), o) for w, o in pairs for t in OPPOSITE_PROMPTS]


def _text_task(name: str, facts: list[tuple[str, str]]):
    def generate(split: str, n: int, seed: int) -> list[RawSample]:
        mine = [RawSample(p, t) for p, t in facts if split_of(p, seed) == split]
        rng_for(name, split, seed).shuffle(mine)
        return mine[:n]

    return generate


TASKS = (
    TaskSpec("arithmetic", "Add or subtract small numbers written as words (zero to twelve).", "general", _text_task("arithmetic", _arithmetic_facts())),
    TaskSpec("opposites", "Name the opposite of a common word.", "general", _text_task("opposites", _opposite_facts())),
)
