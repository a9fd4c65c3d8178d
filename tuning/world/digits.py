"""Downstream task ``digits``: read scikit-learn's bundled handwritten digits (a real image set).

The 1,797 8×8 grey images of ``sklearn.datasets.load_digits`` (UCI, 16 grey levels)
are scaled to 32×32 RGB, white ink on black. Answers are numerals (``"7"``), an
answer style the base never produces. Splits are by image, disjoint.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from deltaserve.tuning.world.render import IMAGE_SIZE
from deltaserve.tuning.world.spec import RawSample, TaskSpec, phrasings_of, rng_for, split_of

PROMPTS = (
    "Which digit is written here?",
    "Read the handwritten digit.",
    "What number does this handwriting show?",
    "What digit is this?",
    "Digit?",
    "Which number is drawn in the picture?",
    "Tell me the digit in this image.",
    "Can you read the number someone wrote here?",
    "Someone scribbled a single digit on this card. Which one is it?",
    "Identify the handwritten numeral.",
    "What's the number?",
    "Recognise the digit shown.",
    "I can't make out this handwriting: which digit from 0 to 9 did they write?",
    "Please transcribe the digit in the image.",
    "Which of the ten digits is this?",
    "Read this number for me",
    "what digit did they write",
    "Name the numeral written in white ink.",
    "This is a scan of a handwritten digit. What is it?",
    "Classify this handwritten digit.",
    "Quel est ce chiffre ?",
    "Welche Ziffer ist das?",
    "¿Qué número está escrito aquí?",
    "Give the digit as a numeral.",
)
"""Phrasings (split into train / val / test phrasings by :func:`~.spec.phrasings_of`)."""


def _generate(split: str, n: int, seed: int) -> list[RawSample]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    rng = rng_for("digits", split, seed)
    indices = [i for i in range(len(digits.images)) if split_of(f"digits:{i}", seed) == split]
    rng.shuffle(indices)
    prompts = phrasings_of("digits", PROMPTS, split, seed)
    samples = []
    for i in indices[:n]:
        grey = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # [8, 8], values 0..16 in the source
        image = (
            Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")
        )
        samples.append(RawSample(rng.choice(prompts), str(int(digits.target[i])), image))
    return samples


TASK = TaskSpec(
    "digits",
    "Read a handwritten digit (scikit-learn's 8x8 digits, scaled to 32x32); answer with the numeral.",
    "downstream",
    _generate,
)
