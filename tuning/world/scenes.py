"""Scenes of the synthetic world: 1–3 coloured shapes on a 2×2 grid of places.

A scene is *what* is shown (shape, colour and place of each object); how it is
drawn (jitter, size, background shade) is decided by :mod:`.render`. The grid is
2×2 on purpose: on a 32×32 image with 8×8 patches each place is exactly 2×2
patches, so the tiny vision tower can learn the world in minutes on a CPU.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {  # name -> RGB; far apart so 32×32 renders stay unambiguous
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
    "purple": (160, 60, 200),
}
PLACES = {  # name -> (row, col) on the 2×2 grid, in reading order
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
NUMBER_WORDS = (
    "zero",
    "one",
    "two",
    "three",
    "four",
    "five",
    "six",
    "seven",
    "eight",
    "nine",
    "ten",
    "eleven",
    "twelve",
)


@dataclass(frozen=True, order=True)
class SceneObject:
    place: str
    colour: str
    shape: str

    @property
    def name(self) -> str:
        """``"red circle"``."""
        return f"{self.colour} {self.shape}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    """In reading order of their places (at most one object per place)."""

    @property
    def key(self) -> str:
        """Canonical content, e.g. ``"top left:red:circle|bottom right:blue:square"``: the unit of the splits."""
        return "|".join(f"{o.place}:{o.colour}:{o.shape}" for o in self.objects)

    def unique_by_name(self) -> list[SceneObject]:
        """Objects whose ``"colour shape"`` occurs once: a question can name them unambiguously."""
        names = [o.name for o in self.objects]
        return [o for o in self.objects if names.count(o.name) == 1]

    def unique_by_shape(self) -> list[SceneObject]:
        shapes = [o.shape for o in self.objects]
        return [o for o in self.objects if shapes.count(o.shape) == 1]


def sample_scene(rng: random.Random, min_objects: int = 1, max_objects: int = 3) -> Scene:
    count = rng.randint(min_objects, max_objects)
    places = sorted(rng.sample(list(PLACES), count), key=lambda p: PLACES[p])
    return Scene(tuple(SceneObject(p, rng.choice(list(COLOURS)), rng.choice(SHAPES)) for p in places))
