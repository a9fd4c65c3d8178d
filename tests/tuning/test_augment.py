"""Reworded training prompts (tuning/augment.py) and the pretraining-only numeral samples."""

from __future__ import annotations

import random
import re

from deltaserve.tuning.augment import augmented, content_words, reword
from deltaserve.tuning.data import Sample
from deltaserve.tuning.pretrain import numeral_samples


def _sample(i: int, prompt: str, target: str = "red") -> Sample:
    return Sample(f"s{i}", prompt, target, None, "colour")


PROMPTS = [
    "What colour is the circle at the top left?",
    "How many blue squares are there?",
    "What do you get when you take two away from seven?",
    "Tell me the opposite of hot.",
    "Describe the picture.",
]


def test_copies_keep_content_words_and_answers_and_vary_the_rest():
    keep = content_words()
    copies = augmented([_sample(i, p) for i, p in enumerate(PROMPTS)], copies=20, seed=0)
    assert len(copies) == 20 * len(PROMPTS)
    assert {c.target for c in copies} == {"red"} and len({c.id for c in copies}) == len(copies)
    changed = 0
    for c in copies:
        original = PROMPTS[int(c.id.split("~")[0][1:])]
        words = {w.lower() for w in re.findall(r"[\w+\-=]+", original)}
        new_words = {w.lower() for w in re.findall(r"[\w+\-=]+", c.prompt)}
        assert (words & keep) <= new_words, (original, c.prompt)  # content never dropped
        assert c.prompt.strip()
        changed += c.prompt != original
    assert changed > 0.7 * len(copies)  # most copies are reworded


def test_plus_and_minus_words_are_kept():
    keep = content_words()
    assert {"plus", "minus", "subtract", "add", "away"} <= keep
    assert {"what", "is", "the", "please"}.isdisjoint(keep)


def test_same_seed_same_copies_other_seed_others():
    samples = [_sample(i, p) for i, p in enumerate(PROMPTS)]
    assert augmented(samples, 3, seed=0) == augmented(samples, 3, seed=0)
    assert augmented(samples, 3, seed=0) != augmented(samples, 3, seed=1)
    assert augmented(samples, 0, seed=0) == []


def test_reword_never_empties_a_prompt():
    rng = random.Random(0)
    for _ in range(200):
        assert reword("Describe.", rng, frozenset(), drop=1.0).strip()


def test_numeral_samples_cover_every_number_both_ways():
    samples = numeral_samples()
    targets = {s.target for s in samples}
    assert {str(n) for n in range(13)} <= targets and {"zero", "seven", "twelve"} <= targets
    assert all(s.image is None and s.task == "numerals" for s in samples)
    assert ("Write seven as a numeral.", "7") in {(s.prompt, s.target) for s in samples}


def test_numeral_samples_can_join_another_tasks_batches():
    assert {s.task for s in numeral_samples("arithmetic")} == {"arithmetic"}
