"""The ``auto`` router: nearest registered examples in the base model's own representations.

Each registered task brings example prompts (text, optionally an image) in its bundle
manifest. A request goes to the task whose examples it resembles most, or to the
untouched base model when the best similarity is below ``threshold`` — the
open-world fallback: anything unlike every task meets the general model.

Representations, and why no second model: a separate embedding model would add
memory, a second set of weights to ship (no model hub here) and a vocabulary that
differs from the base's. The base already provides two representations:

- **text** — the base's tokenizer. A prompt becomes TF-IDF-weighted token unigrams
  and bigrams (lower-cased). Task prompts are short instructions whose wording
  identifies the task; token n-grams capture wording exactly, cost microseconds, and
  need no forward pass. Terms no task uses get the highest IDF, so a prompt made of
  unfamiliar words scores low against every task (→ base).
- **image** — the base's own vision tower (the CLIP encoder LLaVA feeds its
  projector), mean-pooled over patches at ``vision_feature_layer``. Used only when
  the request and a task's examples both have images; it separates image
  distributions (handwritten digits vs rendered scenes) that text alone may not.

Score of a task = max over its examples of ``(1 - image_weight)·cos_text +
image_weight·cos_image`` (``cos_text`` alone when either side has no image).
Options (``--router-opt key=value``): ``threshold`` (default 0.5), ``image_weight``
(default 0.3), ``margin`` (default 0.0: the best task must beat the runner-up by
this much, else base).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from deltaserve.server.routing import RouteDecision, RouteQuery, Router, TaskCard

_SPACE = re.compile(r"\s+")


class TextVectorizer:
    """TF-IDF over the base tokenizer's unigrams and bigrams, fitted on the task examples."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.idf: dict[tuple[int, ...], float] = {}
        self.unseen_idf = 1.0

    def terms(self, text: str) -> Counter:
        ids = self.tokenizer(_SPACE.sub(" ", text.lower()).strip(), add_special_tokens=False).input_ids
        grams = [(i,) for i in ids] + [tuple(ids[k : k + 2]) for k in range(len(ids) - 1)]
        return Counter(grams)

    def fit(self, documents: list[str]) -> None:
        df: Counter = Counter()
        for doc in documents:
            df.update(set(self.terms(doc)))
        n = len(documents)
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        self.unseen_idf = math.log(1 + n) + 1.0  # as rare as possible: unfamiliar words dilute similarity

    def vector(self, text: str) -> dict[tuple[int, ...], float]:
        tf = self.terms(text)
        vec = {t: (1.0 + math.log(c)) * self.idf.get(t, self.unseen_idf) for t, c in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {t: v / norm for t, v in vec.items()}


def _cos(a: dict, b: dict) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(t, 0.0) for t, v in a.items())


class VisionEncoder:
    """The base's CLIP vision tower (weights from the base checkpoint), pooled to one unit vector per image."""

    def __init__(self, base_dir: str | Path):
        import torch
        from safetensors import safe_open
        from transformers import AutoConfig, AutoProcessor, CLIPVisionModel

        config = AutoConfig.from_pretrained(str(base_dir))
        self.layer = getattr(config, "vision_feature_layer", -2)
        self.model = CLIPVisionModel(config.vision_config).eval()
        state = {}
        for file in sorted(Path(base_dir).glob("*.safetensors")):
            with safe_open(str(file), "pt") as f:
                for key in f.keys():
                    if key.startswith("vision_tower."):
                        state[key.removeprefix("vision_tower.")] = f.get_tensor(key)
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        if unexpected or any(not k.endswith("position_ids") for k in missing):
            raise RuntimeError(f"vision tower weights do not match: missing {missing}, unexpected {unexpected}")
        self.processor = AutoProcessor.from_pretrained(str(base_dir)).image_processor
        self._torch = torch

    def __call__(self, image) -> np.ndarray:
        with self._torch.no_grad():
            pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
            hidden = self.model(pixel_values=pixels, output_hidden_states=True).hidden_states[self.layer]  # [1, 1 + patches, d]
            pooled = hidden[0, 1:].mean(0).numpy()  # drop CLS, as LLaVA's "default" strategy does
        return pooled / (np.linalg.norm(pooled) or 1.0)


class AutoRouter(Router):
    name = "auto"

    def __init__(self, options: dict[str, str] | None = None, *, engine: Any = None, base_dir: str | None = None, **context: Any):
        super().__init__(options)
        self.threshold = float(self.options.get("threshold", 0.5))
        self.image_weight = float(self.options.get("image_weight", 0.3))
        self.margin = float(self.options.get("margin", 0.0))
        tokenizer = engine.tokenizer if engine is not None else _load_tokenizer(base_dir)
        self.text = TextVectorizer(tokenizer)
        self._base_dir = base_dir
        self._vision: VisionEncoder | None = None
        self._tasks: list[tuple[str, list[tuple[dict, np.ndarray | None]]]] = []

    def _encode_image(self, image) -> np.ndarray | None:
        if image is None or self._base_dir is None:
            return None
        if self._vision is None:
            self._vision = VisionEncoder(self._base_dir)
        return self._vision(image)

    def update(self, tasks: list[TaskCard]) -> None:
        self.text.fit([text for t in tasks for text, _ in t.examples] or [""])
        self._tasks = [
            (t.name, [(self.text.vector(text), self._encode_image(image)) for text, image in t.examples]) for t in tasks if t.examples
        ]

    def scores(self, query: RouteQuery) -> dict[str, float]:
        """Similarity of the query to every task (the router's evidence)."""
        qtext = self.text.vector(query.text)
        qimage = self._encode_image(query.image) if any(img is not None for _, ex in self._tasks for _, img in ex) else None
        out = {}
        for name, examples in self._tasks:
            best = 0.0
            for etext, eimage in examples:
                s = _cos(qtext, etext)
                if qimage is not None and eimage is not None:
                    s = (1 - self.image_weight) * s + self.image_weight * float(qimage @ eimage)
                best = max(best, s)
            out[name] = best
        return out

    def route(self, query: RouteQuery) -> RouteDecision:
        scores = self.scores(query)
        if not scores:
            return RouteDecision(None, 0.0, "no task with routing examples is registered", self.name)
        ranked = sorted(scores.items(), key=lambda kv: kv[1], reverse=True)
        best, score = ranked[0]
        runner_up = ranked[1][1] if len(ranked) > 1 else 0.0
        if score < self.threshold:
            return RouteDecision(None, score, f"best match `{best}` ({score:.2f}) is below the threshold {self.threshold:.2f}: open world", self.name)
        if score - runner_up < self.margin:
            return RouteDecision(None, score, f"`{best}` ({score:.2f}) and `{ranked[1][0]}` ({runner_up:.2f}) are too close", self.name)
        return RouteDecision(best, score, f"closest examples are `{best}`'s ({score:.2f}; next {runner_up:.2f})", self.name)


def _load_tokenizer(base_dir: str | None):
    from transformers import AutoTokenizer

    if base_dir is None:
        raise ValueError("the auto router needs the engine's tokenizer or the base directory")
    return AutoTokenizer.from_pretrained(str(base_dir))
