"""Downstream task ``digits``: read scikit-learn's bundled handwritten digits (a real image set).

The 1,797 8×8 grey images of ``sklearn.datasets.load_digits`` (UCI, 16 grey levels)
are scaled to 32×32 RGB, white ink on black. Answers are numerals (``"7"``), an
answer style the base never produces. Splits are by image, disjoint.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from deltaserve.tuning.world.render import IMAGE_SIZE
from deltaserve.tuning.world.spec import RawSample, TaskSpec, rng_for, split_of

PROMPTS = ("Which digit is written here?", "Read the handwritten digit.", "What number does this handwriting show?")


def _generate(split: str, n: int, seed: int) -> list[RawSample]:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    digits = load_digits()
    rng = rng_for("digits", split, seed)
    indices = [i for i in range(len(digits.images)) if split_of(f"digits:{i}", seed) == split]
    rng.shuffle(indices)
    samples = []
    for i in indices[:n]:
        grey = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)  # [8, 8], values 0..16 in the source
        image = Image.fromarray(grey, mode="L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BILINEAR).convert("RGB")
        samples.append(RawSample(rng.choice(PROMPTS), str(int(digits.target[i])), image))
    return samples


TASK = TaskSpec("digits", "Read a handwritten digit (scikit-learn's 8x8 digits, scaled to 32x32); answer with the numeral.", "downstream", _generate)
