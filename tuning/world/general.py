"""The general ("open-world") scene tasks the base is pretrained on: caption, colour, count, position."""

from __future__ import annotations

import random

from deltaserve.tuning.world.scene_tasks import scene_task
from deltaserve.tuning.world.scenes import COLOURS, NUMBER_WORDS, SHAPES, Scene
from deltaserve.tuning.world.spec import TaskSpec

CAPTION_PROMPTS = ("Describe the image.", "What is in the picture?", "Give a caption for this image.")
COLOUR_PROMPTS = ("What colour is the {ref}?", "Which colour does the {ref} have?", "Tell me the colour of the {ref}.")
COUNT_PROMPTS = ("How many {what} are there?", "Count the {what}.", "How many {what} are in the picture?")
POSITION_PROMPTS = ("Where is the {ref}?", "In which part of the image is the {ref}?", "Locate the {ref}.")


def caption(scene: Scene) -> str:
    """``"red circle top left, blue square bottom right"`` (reading order)."""
    return ", ".join(f"{o.name} {o.place}" for o in scene.objects)


def _caption_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    return rng.choice(CAPTION_PROMPTS), caption(scene)


def _colour_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    ref = obj.shape if obj in scene.unique_by_shape() and rng.random() < 0.5 else f"shape at the {obj.place}"
    return rng.choice(COLOUR_PROMPTS).format(ref=ref), obj.colour


def _count_qa(scene: Scene, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(("all", "colour", "shape"))
    if kind == "all":
        what, count = "shapes", len(scene.objects)
    elif kind == "colour":
        colour = rng.choice(list(COLOURS))
        what, count = f"{colour} shapes", sum(o.colour == colour for o in scene.objects)
    else:
        shape = rng.choice(SHAPES)
        what, count = f"{shape}s", sum(o.shape == shape for o in scene.objects)
    return rng.choice(COUNT_PROMPTS).format(what=what), NUMBER_WORDS[count]


def _position_qa(scene: Scene, rng: random.Random) -> tuple[str, str] | None:
    candidates = scene.unique_by_name()
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return rng.choice(POSITION_PROMPTS).format(ref=obj.name), obj.place


TASKS = (
    # A caption names up to three objects (~15 tokens): token F1 gives partial credit where
    # exact match scores one wrong word like a wrong caption (exact match is reported beside it).
    TaskSpec("caption", "Describe a scene of coloured shapes: colour, shape and place of each, in reading order.", "general", scene_task("caption", _caption_qa), metric="token_f1"),
    TaskSpec("colour", "Name the colour of a shape in a scene.", "general", scene_task("colour", _colour_qa)),
    TaskSpec("count", "Count the shapes (all, of a colour, or of a kind) in a scene.", "general", scene_task("count", _count_qa)),
    TaskSpec("position", "Say where a named shape is (top/bottom, left/right).", "general", scene_task("position", _position_qa)),
)
