"""The general ("open-world") scene tasks the base is pretrained on: caption, colour, count, position."""

from __future__ import annotations

import random

from deltaserve.tuning.world.scene_tasks import scene_task
from deltaserve.tuning.world.scenes import COLOURS, NUMBER_WORDS, SHAPES, Scene
from deltaserve.tuning.world.spec import TaskSpec, fill

CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in the picture?",
    "Give a caption for this image.",
    "Caption?",
    "What do you see?",
    "List the shapes in this picture with their colours and places.",
    "Write a short caption.",
    "Describe this scene for someone who cannot see it.",
    "What does the picture show?",
    "Summarise the image in one line.",
    "Tell me everything that is in this image.",
    "Can you describe what's drawn here?",
    "describe the picture",
    "Give me a description of the scene, shape by shape.",
    "What objects are in this image and where?",
    "Please caption the picture.",
    "Explain what this drawing contains.",
    "I need a caption for this figure.",
    "What's shown here?",
    "Describe every shape you can see.",
    "Décris l'image.",
    "Beschreibe das Bild.",
    "Describe la imagen.",
    "Write an alt text for this image.",
)
COLOUR_PROMPTS = (
    "What colour is the {ref}?",
    "Which colour does the {ref} have?",
    "Tell me the colour of the {ref}.",
    "Colour of the {ref}?",
    "What color is the {ref}?",
    "Which colour is the {ref} painted in?",
    "Name the colour of the {ref}.",
    "The {ref}: what colour is it?",
    "In what colour is the {ref} drawn?",
    "Can you tell me which colour the {ref} is?",
    "what colour is the {ref}",
    "I want to know the colour of the {ref}.",
    "Identify the colour of the {ref}.",
    "Which color does the {ref} have?",
    "What is the colour of the {ref}?",
    "Say the colour of the {ref}, please.",
    "How is the {ref} coloured?",
    "Look at the {ref}. Which colour is it?",
    "Give the colour of the {ref} in one word.",
    "{Ref} colour?",
    "De quelle couleur est le {ref} ?",
    "Welche Farbe hat der {ref}?",
    "¿De qué color es el {ref}?",
    "Tell me what colour the {ref} is.",
)
COUNT_PROMPTS = (
    "How many {what} are there?",
    "Count the {what}.",
    "How many {what} are in the picture?",
    "Number of {what}?",
    "How many {what} can you see?",
    "Count all the {what} in the image.",
    "What is the number of {what} here?",
    "Tell me how many {what} there are.",
    "how many {what}",
    "Can you count the {what} for me?",
    "How many {what} does the image contain?",
    "Give the count of {what}.",
    "I need the number of {what} in this picture.",
    "Count the {what}, please.",
    "How many {what} are drawn?",
    "What's the total number of {what}?",
    "Please tell me the number of {what} shown.",
    "How many {what} appear in the scene?",
    "{What}: how many?",
    "Count how many {what} you see in this drawing.",
    "Combien de {what} y a-t-il ?",
    "Wie viele {what} gibt es?",
    "¿Cuántos {what} hay?",
    "How many {what} are visible?",
)
POSITION_PROMPTS = (
    "Where is the {ref}?",
    "In which part of the image is the {ref}?",
    "Locate the {ref}.",
    "Where's the {ref}?",
    "Which corner is the {ref} in?",
    "Find the {ref} in the picture.",
    "Where can I see the {ref}?",
    "Tell me where the {ref} is.",
    "where is the {ref}",
    "In which quarter of the picture do you find the {ref}?",
    "Where has the {ref} been drawn?",
    "Position of the {ref}?",
    "Can you tell me where the {ref} is located?",
    "Point out the {ref}: top or bottom, left or right?",
    "Where in the image does the {ref} appear?",
    "Which part of the picture holds the {ref}?",
    "Say where the {ref} is, please.",
    "Where exactly is the {ref} placed?",
    "I am looking for the {ref}. Where is it?",
    "{Ref}: where?",
    "Où est le {ref} ?",
    "Wo ist der {ref}?",
    "¿Dónde está el {ref}?",
    "Give the location of the {ref}.",
)
"""Phrasings of each general task (split into train / val / test phrasings by :func:`~.spec.phrasings_of`)."""


def caption(scene: Scene) -> str:
    """``"red circle top left, blue square bottom right"`` (reading order)."""
    return ", ".join(f"{o.name} {o.place}" for o in scene.objects)


def _caption_qa(scene: Scene, rng: random.Random, prompts: tuple[str, ...]) -> tuple[str, str]:
    return rng.choice(prompts), caption(scene)


def _colour_qa(scene: Scene, rng: random.Random, prompts: tuple[str, ...]) -> tuple[str, str]:
    obj = rng.choice(scene.objects)
    ref = obj.shape if obj in scene.unique_by_shape() and rng.random() < 0.5 else f"shape at the {obj.place}"
    return fill(rng.choice(prompts), ref=ref), obj.colour


def _count_qa(scene: Scene, rng: random.Random, prompts: tuple[str, ...]) -> tuple[str, str]:
    kind = rng.choice(("all", "colour", "shape"))
    if kind == "all":
        what, count = "shapes", len(scene.objects)
    elif kind == "colour":
        colour = rng.choice(list(COLOURS))
        what, count = f"{colour} shapes", sum(o.colour == colour for o in scene.objects)
    else:
        shape = rng.choice(SHAPES)
        what, count = f"{shape}s", sum(o.shape == shape for o in scene.objects)
    return fill(rng.choice(prompts), what=what), NUMBER_WORDS[count]


def _position_qa(scene: Scene, rng: random.Random, prompts: tuple[str, ...]) -> tuple[str, str] | None:
    candidates = scene.unique_by_name()
    if not candidates:
        return None
    obj = rng.choice(candidates)
    return fill(rng.choice(prompts), ref=obj.name), obj.place


TASKS = (
    # A caption names up to three objects (~15 tokens): token F1 gives partial credit where
    # exact match scores one wrong word like a wrong caption (exact match is reported beside it).
    TaskSpec(
        "caption",
        "Describe a scene of coloured shapes: colour, shape and place of each, in reading order.",
        "general",
        scene_task("caption", _caption_qa, CAPTION_PROMPTS),
        metric="token_f1",
    ),
    TaskSpec(
        "colour", "Name the colour of a shape in a scene.", "general", scene_task("colour", _colour_qa, COLOUR_PROMPTS)
    ),
    TaskSpec(
        "count",
        "Count the shapes (all, of a colour, or of a kind) in a scene.",
        "general",
        scene_task("count", _count_qa, COUNT_PROMPTS),
    ),
    TaskSpec(
        "position",
        "Say where a named shape is (top/bottom, left/right).",
        "general",
        scene_task("position", _position_qa, POSITION_PROMPTS),
    ),
)
