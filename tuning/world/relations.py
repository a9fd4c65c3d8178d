"""Downstream task ``relations``: where is one shape relative to another (a new skill over known scenes).

The base knows each shape's place; it never learned to *compare* two places, nor
the answer words (``"above left"``, ``"right"``, …). Scenes share the general
tasks' split assignment, so no test scene was seen in pretraining either.
"""

from __future__ import annotations

import random

from deltaserve.tuning.world.scene_tasks import scene_task
from deltaserve.tuning.world.scenes import PLACES, Scene
from deltaserve.tuning.world.spec import TaskSpec, fill

PROMPTS = (
    "Where is the {a} relative to the {b}?",
    "Seen from the {b}, in which direction is the {a}?",
    "What is the direction from the {b} to the {a}?",
    "In which direction from the {b} is the {a}?",
    "How is the {a} placed compared with the {b}?",
    "{A} relative to {b}?",
    "Which way do I go from the {b} to reach the {a}?",
    "Is the {a} above, below, left or right of the {b}?",
    "Describe where the {a} lies with respect to the {b}.",
    "Starting at the {b}, where would I find the {a}?",
    "Give the direction of the {a} as seen from the {b}.",
    "Where does the {a} sit in relation to the {b}?",
    "Compared to the {b}, where's the {a}?",
    "If you stand on the {b}, which direction is the {a}?",
    "Position of the {a} relative to the {b}, please.",
    "what direction is the {a} from the {b}",
    "Tell me whether the {a} is above or below, left or right of the {b}.",
    "The {b} is my reference point. Where is the {a}?",
    "Relative position: {a} vs {b}?",
    "How do the {a} and the {b} relate in position? Answer from the {b}'s point of view.",
    "Où est le {a} par rapport au {b} ?",
    "Wo liegt der {a} im Verhältnis zum {b}?",
    "¿Dónde está el {a} respecto al {b}?",
    "From the {b}, point me to the {a}.",
)
"""Phrasings (split into train / val / test phrasings by :func:`~.spec.phrasings_of`)."""


def relation(place_a: str, place_b: str) -> str:
    """Direction of ``place_a`` as seen from ``place_b``: ``"above"``, ``"below right"``, ``"left"``, …"""
    (ra, ca), (rb, cb) = PLACES[place_a], PLACES[place_b]
    vertical = "above" if ra < rb else "below" if ra > rb else ""
    horizontal = "left" if ca < cb else "right" if ca > cb else ""
    return " ".join(w for w in (vertical, horizontal) if w)


def _qa(scene: Scene, rng: random.Random, prompts: tuple[str, ...]) -> tuple[str, str] | None:
    candidates = scene.unique_by_name()
    if len(candidates) < 2:
        return None
    a, b = rng.sample(candidates, 2)
    return fill(rng.choice(prompts), a=a.name, b=b.name), relation(a.place, b.place)


TASK = TaskSpec(
    "relations",
    "Say in which direction one named shape lies from another (e.g. 'above left').",
    "downstream",
    scene_task("relations", _qa, PROMPTS, min_objects=2),
)
