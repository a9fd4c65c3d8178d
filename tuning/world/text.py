"""Text-only general tasks: arithmetic in words and opposites.

These test *retained knowledge*: the facts are finite, so the splits hold out
*phrasings* — a test prompt's wording never occurs in training, while the fact itself
does under another phrasing. That is the kind of general knowledge fine-tuning is
known to erase.
"""

from __future__ import annotations

from deltaserve.tuning.world.scenes import NUMBER_WORDS
from deltaserve.tuning.world.spec import RawSample, TaskSpec, fill, phrasings_of, rng_for

PLUS_PROMPTS = (
    "What is {a} plus {b}?",
    "Add {a} and {b}.",
    "{A} plus {b} equals what?",
    "{A} + {b} = ?",
    "What do you get when you add {b} to {a}?",
    "Sum of {a} and {b}?",
    "How much is {a} plus {b}?",
    "what's {a} plus {b}",
    "If I have {a} apples and get {b} more, how many do I have?",
    "Calculate {a} plus {b}.",
    "Tell me the sum of {a} and {b}.",
    "{A} and {b} together make how many?",
    "Combien font {a} plus {b} ?",
    "Was ist {a} plus {b}?",
    "Please add {b} to {a}.",
    "What is the total of {a} and {b}?",
)
MINUS_PROMPTS = (
    "What is {a} minus {b}?",
    "Subtract {b} from {a}.",
    "{A} minus {b} equals what?",
    "{A} - {b} = ?",
    "What do you get when you take {b} away from {a}?",
    "Difference between {a} and {b}?",
    "How much is {a} minus {b}?",
    "what's {a} minus {b}",
    "If I have {a} apples and eat {b}, how many are left?",
    "Calculate {a} minus {b}.",
    "Tell me what {a} minus {b} is.",
    "Take {b} from {a}: what remains?",
    "Combien font {a} moins {b} ?",
    "Was ist {a} minus {b}?",
    "Please subtract {b} from {a}.",
    "{A} take away {b} is how much?",
)
OPPOSITE_PROMPTS = (
    "What is the opposite of {w}?",
    "Name the opposite of {w}.",
    "Give the word opposite to {w}.",
    "Opposite of {w}?",
    "What's the antonym of {w}?",
    "Which word means the opposite of {w}?",
    "Tell me the opposite of the word {w}.",
    "what is the opposite of {w}",
    "If something is not {w}, what is it? Give the opposite word.",
    "Antonym for {w}, please.",
    "What word is the reverse of {w}?",
    'Give me an antonym of "{w}".',
    "The opposite of {w} is what?",
    "Find the opposite word for {w}.",
    "I need the opposite of {w}.",
    "Which word is opposite in meaning to {w}?",
    "{W}: opposite?",
    "Name a word that means the reverse of {w}.",
    "What would you call the opposite of {w}?",
    "Say the opposite of {w}.",
    "Quel est le contraire de {w} ?",
    "Was ist das Gegenteil von {w}?",
    "¿Cuál es lo contrario de {w}?",
    "Give the opposite of {w} in one word.",
)
"""Phrasings (split into train / val / test phrasings by :func:`~.spec.phrasings_of`)."""
OPPOSITES = (
    ("big", "small"), ("hot", "cold"), ("up", "down"), ("left", "right"), ("top", "bottom"), ("yes", "no"),
    ("true", "false"), ("black", "white"), ("first", "last"), ("open", "closed"), ("fast", "slow"), ("old", "new"),
    ("day", "night"), ("in", "out"), ("above", "below"), ("more", "less"), ("light", "dark"), ("high", "low"),
    ("long", "short"), ("early", "late"), ("happy", "sad"), ("wet", "dry"), ("full", "empty"), ("hard", "soft"),
)  # fmt: skip


def _arithmetic_facts(split: str, seed: int) -> list[tuple[str, str]]:
    plus = phrasings_of("arithmetic-plus", PLUS_PROMPTS, split, seed)
    minus = phrasings_of("arithmetic-minus", MINUS_PROMPTS, split, seed)
    facts = []
    for a in range(len(NUMBER_WORDS)):
        for b in range(len(NUMBER_WORDS)):
            wa, wb = NUMBER_WORDS[a], NUMBER_WORDS[b]
            if a + b < len(NUMBER_WORDS):
                facts += [(fill(t, a=wa, b=wb), NUMBER_WORDS[a + b]) for t in plus]
            if a - b >= 0:
                facts += [(fill(t, a=wa, b=wb), NUMBER_WORDS[a - b]) for t in minus]
    return facts


def _opposite_facts(split: str, seed: int) -> list[tuple[str, str]]:
    pairs = list(OPPOSITES) + [(b, a) for a, b in OPPOSITES]
    return [(fill(t, w=w), o) for w, o in pairs for t in phrasings_of("opposites", OPPOSITE_PROMPTS, split, seed)]


def _text_task(name: str, facts):
    """Every (fact, phrasing) pair of ``split``'s phrasings, shuffled: a test prompt's wording never occurs in training."""

    def generate(split: str, n: int, seed: int) -> list[RawSample]:
        mine = [RawSample(p, t) for p, t in facts(split, seed)]
        rng_for(name, split, seed).shuffle(mine)
        return mine[:n]

    return generate


TASKS = (
    TaskSpec(
        "arithmetic",
        "Add or subtract small numbers written as words (zero to twelve).",
        "general",
        _text_task("arithmetic", _arithmetic_facts),
    ),
    TaskSpec("opposites", "Name the opposite of a common word.", "general", _text_task("opposites", _opposite_facts)),
)
