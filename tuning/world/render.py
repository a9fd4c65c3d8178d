"""Draw a :class:`~.scenes.Scene` as a 32×32 RGB image with PIL.

Each object sits in its 16×16 cell with a random size (9–12 px) and a jitter of
up to 2 px, on a dark background whose shade varies a little: the same scene
never renders to the same pixels twice, so models have to learn the concepts,
not the bitmaps. Drawing is aliased (no anti-aliasing), hence deterministic.
"""

from __future__ import annotations

import random

from PIL import Image, ImageDraw

from deltaserve.tuning.world.scenes import COLOURS, PLACES, Scene

IMAGE_SIZE = 32
_CELL = IMAGE_SIZE // 2


def render(scene: Scene, rng: random.Random) -> Image.Image:
    shade = rng.randint(0, 40)
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (shade, shade, shade))
    draw = ImageDraw.Draw(image)
    for obj in scene.objects:
        row, col = PLACES[obj.place]
        size = rng.randint(9, 12)
        cx = col * _CELL + _CELL // 2 + rng.randint(-2, 2)
        cy = row * _CELL + _CELL // 2 + rng.randint(-2, 2)
        _draw_shape(draw, obj.shape, cx, cy, size, COLOURS[obj.colour])
    return image


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: int, cy: int, size: int, fill: tuple[int, int, int]) -> None:
    half = size // 2
    x0, y0, x1, y1 = cx - half, cy - half, cx - half + size - 1, cy - half + size - 1
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        inset = 1  # a full-size square would outweigh the other shapes by area
        draw.rectangle((x0 + inset, y0 + inset, x1 - inset, y1 - inset), fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        bar = max(2, size // 4)
        draw.rectangle((cx - bar // 2, y0, cx - bar // 2 + bar, y1), fill=fill)
        draw.rectangle((x0, cy - bar // 2, x1, cy - bar // 2 + bar), fill=fill)
    else:
        raise ValueError(f"unknown shape `{shape}`")
