"""The ``coverage`` router (the first ``auto`` router, kept as a named option): token n-gram coverage of a task's phrasings.

It recognises a task's *template phrasings* with other slot words, and little else: on
hand-written paraphrases it sent 1 of 80 to the right expert (see ``docs/routing-results.md``),
which is why ``auto`` is now a classifier over meaning-carrying embeddings
(:mod:`.router_auto`). Select it with ``--router coverage``.

Each registered task brings example prompts (text, optionally an image) in its bundle
manifest — a handful of its training prompts. A request goes to the task whose
examples it matches, or to the untouched base model when no task matches well
enough: the open-world fallback (anything unlike every task meets the general model).

Representations, and why no second model: a separate embedding model would add
memory, a second set of weights to ship (no model hub here) and a vocabulary that
differs from the base's. The base already provides two representations:

- **text** — the base's tokenizer. A prompt (lower-cased, with a leading space so that
  every word takes its in-sentence token form) becomes the set of its token unigrams
  and bigrams, weighted by IDF over all registered examples. Costs microseconds, no
  forward pass.
- **image** — the base's own vision tower (the CLIP encoder LLaVA feeds its
  projector), mean-pooled over patches at ``vision_feature_layer``.

Text score (``text=coverage``, the default). Task prompts are instructions built from
a few phrasings with slots (``"Where is the {a} relative to the {b}?"``). Plain
nearest-example cosine (this router's first version) confuses a *fragment* of a phrasing
with the phrasing itself: ``"Where is the red square?"`` (the base's open-world
``position`` task) shares most of its n-grams with ``"Where is the red square relative
to the blue circle?"`` (``relations``) and scored higher than many true ``relations``
prompts with other slot words — on the validation split 36 % of ``position`` prompts
went to ``relations``, and no threshold separated the two. The coverage score asks two
questions instead:

- *precision* ``P`` — how much of the request's wording (IDF mass of its terms) occurs
  anywhere in the task's examples. Unfamiliar words (free text) pull it down;
- *recall* ``R`` — how much of the nearest example's **phrasing** the request contains.
  An example's term counts (IDF-weighted) in proportion to its *support*: the share of the
  example's ``support_k`` most similar sibling examples (set cosine, no IDF, so that rare
  slot words do not decide who is alike) that contain it too. Terms of the phrasing are
  shared by the siblings (support ≈ 1), slot fillers are not, so a request with other slot
  words still covers the phrasing, while a fragment of it does not.

``text score = F2(P, R)`` (the F-score that counts recall twice): containing one of the
task's phrasings matters most; extra unfamiliar words lower the score but do not veto it
(``"Translate to pirate speak: where is the treasure"`` still reaches a task whose
examples are ``"Translate to pirate speak: …"``). ``text=cosine`` is the plain
nearest-example TF-IDF cosine, for tasks whose examples are free-form text rather than
phrasings with slots (choose its threshold separately).

Image score (only when ``image_weight > 0``): cosine of the request's image to the task's
nearest example image, on features centred by the mean of all registered example images
(raw features of the small CLIP tower are all alike — cosine ≈ 0.95 between any two of
the world's images with the random-init tower —; centring keeps what tells the image
distributions apart). Used only when both
the request and the task have images.

Score of a task = ``(1 - image_weight)·text + image_weight·image`` (text alone when
either side has no image). The best task wins if its score reaches ``threshold`` and
beats the runner-up by ``margin``; else the base.

Defaults — chosen when every task of the tuning world had three template phrasings
(world v1), on its validation split, over five draws of 16–32 examples per task (kept as
they were; ``bench/routing.py`` measures this router beside ``auto`` on today's world):

- ``threshold=0.73`` — with the text score alone every threshold in 0.69–0.77 routes all
  validation prompts right in every draw (downstream prompts score ≥ 0.77, the general
  tasks' ≤ 0.68, free text ≤ 0.25); 0.73 is the middle of that interval;
- ``image_weight=0.0`` — the text score alone separates every class; weighting the image
  only narrows the interval (0.1: 0.71–0.77, 0.2: 0.74–0.75, 0.3 and up: below 100 %),
  because ``relations`` asks about the same rendered scenes as the open-world tasks. At 0
  no image is encoded per request (and the decision does not depend on which base,
  random-init or pretrained, the tower comes from: the tokenizer is the same);
- ``margin=0.0`` — the two downstream tasks never compete (a task scores ≤ 0.16 on the
  other's prompts); ``support_k=5`` — about the number of examples per phrasing in 16–32
  examples of three phrasings; the smallest gap between downstream and open-world scores
  over the draws was 0.09 with 5 siblings, 0.06 with 8 and 0.01 with 3.

Options (``--router-opt key=value``): ``threshold``, ``image_weight``, ``margin``,
``text`` (``coverage`` | ``cosine``), ``support_k``; unknown keys are refused.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

from deltaserve.server.routing import RouteDecision, RouteQuery, Router, TaskCard
from deltaserve.server.vision_features import VisionEncoder, unit

_SPACE = re.compile(r"\s+")
Term = tuple[int, ...]

DEFAULTS = {"threshold": 0.73, "image_weight": 0.0, "margin": 0.0, "text": "coverage", "support_k": 5}
TEXT_MODES = ("coverage", "cosine")


class TextVectorizer:
    """Token unigrams and bigrams of the base tokenizer, IDF fitted on the registered examples."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.idf: dict[Term, float] = {}
        self.unseen_idf = 1.0

    def terms(self, text: str) -> Counter:
        # Leading space: a word at the start tokenizes like the same word mid-sentence (" where", not "Wh"+"ere").
        ids = self.tokenizer(" " + _SPACE.sub(" ", text.lower()).strip(), add_special_tokens=False).input_ids
        grams = [(i,) for i in ids] + [tuple(ids[k : k + 2]) for k in range(len(ids) - 1)]
        return Counter(grams)

    def fit(self, documents: list[str]) -> None:
        df: Counter = Counter()
        for doc in documents:
            df.update(set(self.terms(doc)))
        n = len(documents)
        self.idf = {t: math.log((1 + n) / (1 + c)) + 1.0 for t, c in df.items()}
        self.unseen_idf = math.log(1 + n) + 1.0  # as rare as possible: unfamiliar words weigh most

    def weight(self, term: Term) -> float:
        return self.idf.get(term, self.unseen_idf)

    def vector(self, text: str) -> dict[Term, float]:
        """Unit TF-IDF vector (``text=cosine``)."""
        tf = self.terms(text)
        vec = {t: (1.0 + math.log(c)) * self.weight(t) for t, c in tf.items()}
        norm = math.sqrt(sum(v * v for v in vec.values())) or 1.0
        return {t: v / norm for t, v in vec.items()}


def _f_beta(precision: float, recall: float, beta: float = 2.0) -> float:
    """F-score counting recall ``beta`` times as much as precision (F2)."""
    if precision <= 0 or recall <= 0:
        return 0.0
    return (1 + beta**2) * precision * recall / (beta**2 * precision + recall)


def _cos(a: dict, b: dict) -> float:
    if len(a) > len(b):
        a, b = b, a
    return sum(v * b.get(t, 0.0) for t, v in a.items())


class TaskWording:
    """One task's examples as phrasings: the task's vocabulary and, per example, how much each term belongs to its phrasing."""

    def __init__(self, vectorizer: TextVectorizer, texts: list[str], support_k: int):
        self.vectorizer = vectorizer
        term_sets = [set(vectorizer.terms(t)) for t in texts]
        self.vocab: set[Term] = set().union(*term_sets) if term_sets else set()
        # Siblings by unweighted (set) cosine: IDF would let rare slot words decide who is alike.
        self.examples: list[tuple[dict[Term, float], float]] = []
        for i, terms in enumerate(term_sets):
            sims = sorted(
                (
                    (len(terms & other) / math.sqrt(len(terms) * len(other) or 1), j)
                    for j, other in enumerate(term_sets)
                    if j != i
                ),
                reverse=True,
            )[:support_k]
            weights = {}
            for t in terms:
                support = sum(t in term_sets[j] for _, j in sims) / len(sims) if sims else 1.0
                weights[t] = vectorizer.weight(t) * support
            self.examples.append((weights, sum(weights.values()) or 1.0))
        self.cosine_vectors = [vectorizer.vector(t) for t in texts]

    def coverage(self, query_terms: set[Term]) -> tuple[float, float, float]:
        """(score, precision, recall) of the best-covered example."""
        mass = sum(self.vectorizer.weight(t) for t in query_terms)
        if not mass or not self.examples:
            return 0.0, 0.0, 0.0
        precision = sum(self.vectorizer.weight(t) for t in query_terms if t in self.vocab) / mass
        recall = max(sum(w for t, w in weights.items() if t in query_terms) / total for weights, total in self.examples)
        return _f_beta(precision, recall), precision, recall

    def cosine(self, query_vector: dict[Term, float]) -> float:
        return max((_cos(query_vector, v) for v in self.cosine_vectors), default=0.0)


class CoverageRouter(Router):
    name = "coverage"

    def __init__(
        self, options: dict[str, str] | None = None, *, engine: Any = None, base_dir: str | None = None, **context: Any
    ):
        super().__init__(options)
        unknown = set(self.options) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown option(s) for the coverage router: {sorted(unknown)}; known: {sorted(DEFAULTS)}")
        opt = {**DEFAULTS, **self.options}
        self.threshold = float(opt["threshold"])
        self.image_weight = float(opt["image_weight"])
        self.margin = float(opt["margin"])
        self.text_mode = str(opt["text"])
        self.support_k = int(opt["support_k"])
        if self.text_mode not in TEXT_MODES:
            raise ValueError(f"coverage router option `text` must be one of {TEXT_MODES}, got {self.text_mode!r}")
        if not 0.0 <= self.image_weight <= 1.0:
            raise ValueError(f"coverage router option `image_weight` must be in [0, 1], got {self.image_weight}")
        if self.support_k < 1:
            raise ValueError(f"coverage router option `support_k` must be ≥ 1, got {self.support_k}")
        tokenizer = engine.tokenizer if engine is not None else _load_tokenizer(base_dir)
        self.text = TextVectorizer(tokenizer)
        self._base_dir = base_dir
        self._images_readable = base_dir is not None and VisionEncoder.supports(base_dir)
        self._vision: VisionEncoder | None = None
        self._tasks: list[tuple[str, TaskWording, np.ndarray | None]] = []
        self._image_mean: np.ndarray | None = None

    @property
    def _uses_images(self) -> bool:
        return self.image_weight > 0 and self._images_readable

    def _features(self, images: list) -> np.ndarray:
        if self._vision is None:
            self._vision = VisionEncoder(self._base_dir)
        return self._vision(images)

    def install(self, tasks: list[TaskCard]) -> None:
        tasks = [t for t in tasks if t.examples]
        self.text.fit([text for t in tasks for text, _ in t.examples] or [""])
        features: list[np.ndarray | None] = []
        for t in tasks:
            images = [img for _, img in t.examples if img is not None]
            features.append(self._features(images) if self._uses_images and images else None)
        known = [f for f in features if f is not None]
        self._image_mean = np.concatenate(known).mean(0) if known else None
        self._tasks = [
            (
                t.name,
                TaskWording(self.text, [text for text, _ in t.examples], self.support_k),
                None if f is None else unit(f - self._image_mean),
            )
            for t, f in zip(tasks, features, strict=True)
        ]

    def components(self, query: RouteQuery) -> dict[str, Evidence]:
        """Text and image evidence for every task (computed once; :meth:`decide` weighs it)."""
        qimage = None
        if query.image is not None and self._image_mean is not None:
            qimage = unit(self._features([query.image])[0] - self._image_mean)
        if self.text_mode == "coverage":
            qterms = set(self.text.terms(query.text))
        else:
            qvector = self.text.vector(query.text)
        out = {}
        for name, wording, images in self._tasks:
            if self.text_mode == "coverage":
                text, precision, recall = wording.coverage(qterms)
                why = f"wording {precision:.0%} known to the task, its nearest phrasing {recall:.0%} covered"
            else:
                text = wording.cosine(qvector)
                why = "nearest example's TF-IDF cosine"
            image = float((images @ qimage).max()) if qimage is not None and images is not None else None
            out[name] = Evidence(text, image, why)
        return out

    def scores(self, query: RouteQuery) -> dict[str, float]:
        """Score of every task (the router's evidence)."""
        return {name: ev.score(self.image_weight) for name, ev in self.components(query).items()}

    def route(self, query: RouteQuery) -> RouteDecision:
        return decide(self.components(query), self.threshold, self.image_weight, self.margin, self.name)


@dataclass(frozen=True)
class Evidence:
    text: float
    image: float | None
    """None: the request or the task has no image (or images are not used)."""
    why: str

    def score(self, image_weight: float) -> float:
        return self.text if self.image is None else (1 - image_weight) * self.text + image_weight * self.image

    def describe(self, image_weight: float) -> str:
        text = f"text {self.text:.2f} ({self.why})"
        return text if self.image is None else f"{text}, image {self.image:.2f} (weight {image_weight:.2f})"


def decide(
    evidence: dict[str, Evidence], threshold: float, image_weight: float, margin: float, router: str = "coverage"
) -> RouteDecision:
    """The decision rule: the best task if it reaches ``threshold`` and beats the runner-up by ``margin``, else the base."""
    if not evidence:
        return RouteDecision(None, 0.0, "no task with routing examples is registered: base model", router)
    ranked = sorted(((ev.score(image_weight), name) for name, ev in evidence.items()), reverse=True)
    score, best = ranked[0]
    runner_up, second = ranked[1] if len(ranked) > 1 else (0.0, None)
    why = evidence[best].describe(image_weight)
    if score < threshold:
        return RouteDecision(
            None,
            score,
            f"best match `{best}` scores {score:.3f} < threshold {threshold:.2f} ({why}): open world, base model",
            router,
        )
    if score - runner_up < margin:
        return RouteDecision(
            None,
            score,
            f"`{best}` ({score:.2f}) and `{second}` ({runner_up:.2f}) are closer than the margin {margin:.2f}: base model",
            router,
        )
    return RouteDecision(
        best,
        score,
        f"`{best}` scores {score:.3f} ≥ threshold {threshold:.2f}: {why}; next best {runner_up:.2f}",
        router,
    )


def _load_tokenizer(base_dir: str | None):
    from transformers import AutoTokenizer

    if base_dir is None:
        raise ValueError("the auto router needs the engine's tokenizer or the base directory")
    return AutoTokenizer.from_pretrained(str(base_dir))
