"""Turn a question-about-a-scene function into a task generator (sampling, splits, rendering)."""

from __future__ import annotations

import random
from collections.abc import Callable

from deltaserve.tuning.world.render import render
from deltaserve.tuning.world.scenes import Scene, sample_scene
from deltaserve.tuning.world.spec import RawSample, phrasings_of, rng_for, split_of

QA = Callable[[Scene, random.Random, tuple[str, ...]], "tuple[str, str] | None"]
"""``qa(scene, rng, phrasings)`` → ``(prompt, target)`` worded with one of ``phrasings``, or None
when the scene does not fit the question."""

_MAX_ATTEMPTS_PER_SAMPLE = 1000


def scene_task(
    name: str, qa: QA, phrasings: tuple[str, ...], min_objects: int = 1
) -> Callable[[str, int, int], list[RawSample]]:
    """A ``generate(split, n, seed)`` that asks ``qa`` about random scenes belonging to ``split``,
    in the phrasings reserved for ``split``."""

    def generate(split: str, n: int, seed: int) -> list[RawSample]:
        rng = rng_for(name, split, seed)
        prompts = phrasings_of(name, phrasings, split, seed)
        samples: list[RawSample] = []
        attempts = 0
        while len(samples) < n:
            attempts += 1
            if attempts > _MAX_ATTEMPTS_PER_SAMPLE * (n + 1):
                raise RuntimeError(f"task `{name}`: cannot find {n} scenes for split `{split}`")
            scene = sample_scene(rng, min_objects=min_objects)
            if split_of(scene.key, seed) != split:
                continue
            pair = qa(scene, rng, prompts)
            if pair is not None:
                samples.append(RawSample(pair[0], pair[1], render(scene, rng)))
        return samples

    return generate
