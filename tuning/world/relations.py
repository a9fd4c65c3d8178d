"""Downstream task ``relations``: where is one shape relative to another (a new skill over known scenes).

The base knows each shape's place; it never learned to *compare* two places, nor
the answer words (``"above left"``, ``"right"``, …). Scenes share the general
tasks' split assignment, so no test scene was seen in pretraining either.
"""

from __future__ import annotations

import random

from deltaserve.tuning.world.scene_tasks import scene_task
from deltaserve.tuning.world.scenes import PLACES, Scene
from deltaserve.tuning.world.spec import TaskSpec

PROMPTS = (
    "Where is the {a} relative to the {b}?",
    "Seen from the {b}, in which direction is the {a}?",
    "What is the direction from the {b} to the {a}?",
)


def relation(place_a: str, place_b: str) -> str:
    """Direction of ``place_a`` as seen from ``place_b``: ``"above"``, ``"below right"``, ``"left"``, …"""
    (ra, ca), (rb, cb) = PLACES[place_a], PLACES[place_b]
    vertical = "above" if ra < rb else "below" if ra > rb else ""
    horizontal = "left" if ca < cb else "right" if ca > cb else ""
    return " ".join(w for w in (vertical, horizontal) if w)


def _qa(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    candidates = scene.unique_by_name()
    if len(candidates) < 2:
        return None
    a, b = rng.sample(candidates, 2)
    return rng.choice(PROMPTS).format(a=a.name, b=b.name), relation(a.place, b.place)


TASK = TaskSpec("relations", "Say in which direction one named shape lies from another (e.g. 'above left').", "downstream", scene_task("relations", _qa, min_objects=2))
