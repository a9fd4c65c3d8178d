"""Routing evaluation on the tuning world and the hand-written sets (used by ``bench/routing.py`` and the routing test).

Three kinds of labelled requests:

- **split** — every validation or test sample of the world's downstream tasks (→ their
  expert) and general tasks (→ the base). World v2 splits by phrasing, so these prompts
  are worded unlike any training prompt (and unlike every router example).
- **paraphrases** — ``bench/routing_sets/paraphrases.jsonl``: hand-written requests for
  the downstream tasks (terse, plain, verbose, typos, other languages), written without
  sight of the world's phrasings; images drawn from the tasks' test splits.
- **open world** — ``bench/routing_sets/open_world.jsonl``: hand-written requests for the
  base (its own skills reworded, near-misses reusing the tasks' words, chat, code, …).

The hand-written sets are never used to choose anything: options are chosen on the
validation split (:func:`choose_options`).
"""

from __future__ import annotations

import itertools
import json
import statistics
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from deltaserve.server.routing import RouteQuery, Router, TaskCard, load_router

SETS = Path(__file__).parent / "routing_sets"
BASE = "base"


@dataclass
class Labeled:
    query: RouteQuery
    expect: str
    """A task name, or ``base``."""
    group: str
    """Where it comes from, e.g. ``split:colour``, ``paraphrase:digits:typo``, ``open-world:near-miss``."""


@dataclass
class Report:
    n: int
    task_recall: float
    """Requests meant for an expert that reached it."""
    open_world_precision: float
    """Requests meant for the base that reached the base."""
    per_group: dict[str, dict[str, int]]
    """group → chosen expert (or base) → count."""
    route_ms_p50: float
    errors: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return self.__dict__


def world_dirs(config=None) -> tuple[Path, Path]:
    """(downstream root, general root) of the cached world — the directories ``deltaserve tune`` uses."""
    from deltaserve.tuning.world import DOWNSTREAM_TASKS, GENERAL_TASKS, WorldConfig, cached_world

    config = config or WorldConfig()
    return cached_world(config, DOWNSTREAM_TASKS), cached_world(config, GENERAL_TASKS)


def task_cards(downstream_root: Path, n_examples: int = 24, seed: int = 0) -> list[TaskCard]:
    """One card per downstream task: the ``n_examples`` training prompts ``deltaserve tune`` would put in its bundle."""
    from deltaserve.tuning.data import load_tasks, pick_examples

    cards = []
    for name, task in load_tasks(downstream_root, type="downstream", splits=("train",)).items():
        examples = [
            (s.prompt, s.load_image() if s.image is not None else None)
            for s in pick_examples(task["train"], n_examples, seed)
        ]
        cards.append(TaskCard(name, "lora", task.info.description, examples))
    return cards


def open_world_file(general_root: Path, work: Path, seed: int = 0) -> Path:
    """The base's own general-task examples exactly as ``deltaserve base pretrain`` writes them beside the base."""
    from deltaserve.tuning.data import load_tasks
    from deltaserve.tuning.pretrain import OPEN_WORLD_EXAMPLES, OPEN_WORLD_FILE, open_world_examples, write_open_world

    tasks = load_tasks(general_root, type="general", splits=("train",))
    return write_open_world(Path(work) / OPEN_WORLD_FILE, open_world_examples(tasks, OPEN_WORLD_EXAMPLES, seed))


def split_queries(downstream_root: Path, general_root: Path, split: str, limit: int | None = None) -> list[Labeled]:
    from deltaserve.tuning.data import load_tasks

    out = []
    for root, kind in ((downstream_root, "downstream"), (general_root, "general")):
        for name, task in load_tasks(root, type=kind, splits=(split,)).items():
            for s in task[split][:limit]:
                image = s.load_image() if s.image is not None else None
                out.append(
                    Labeled(RouteQuery(s.prompt, image), name if kind == "downstream" else BASE, f"split:{name}")
                )
    return out


def image_pools(downstream_root: Path, general_root: Path) -> dict[str, list]:
    """Test-split images by kind: ``digit`` (the digits task) and ``scene`` (the caption task's scenes)."""
    from deltaserve.tuning.data import load_task

    digits = load_task(downstream_root / "digits", splits=("test",))["test"]
    scenes = load_task(general_root / "caption", splits=("test",))["test"]
    return {"digit": [s.load_image() for s in digits], "scene": [s.load_image() for s in scenes]}


def set_queries(path: Path, pools: dict[str, list]) -> list[Labeled]:
    """A hand-written set; the i-th request that needs a ``digit``/``scene`` image gets the pool's i-th image."""
    out, used = [], Counter()
    kind = "paraphrase" if "paraphrase" in path.name else "open-world"
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        image = None
        if row.get("image"):
            pool = pools[row["image"]]
            image = pool[used[row["image"]] % len(pool)]
            used[row["image"]] += 1
        group = f"{kind}:{row['expect']}:{row['style']}" if kind == "paraphrase" else f"{kind}:{row['style']}"
        out.append(Labeled(RouteQuery(row["text"], image), row["expect"], group))
    return out


def make_router(
    base_dir: Path, cards: list[TaskCard], options: dict[str, str] | None = None, name: str = "auto"
) -> Router:
    router = load_router(name, options or {}, base_dir=str(base_dir))
    router.update(cards)
    return router


def evaluate(router: Router, queries: list[Labeled], max_errors: int = 40) -> Report:
    per_group: dict[str, Counter] = defaultdict(Counter)
    times, errors = [], []
    right = {"task": [0, 0], "base": [0, 0]}
    for q in queries:
        started = time.perf_counter()
        decision = router.route(q.query)
        times.append((time.perf_counter() - started) * 1000)
        chosen = decision.expert or BASE
        per_group[q.group][chosen] += 1
        bucket = right["base" if q.expect == BASE else "task"]
        bucket[0] += chosen == q.expect
        bucket[1] += 1
        if chosen != q.expect and len(errors) < max_errors:
            errors.append(
                {
                    "text": q.query.text,
                    "image": q.query.image is not None,
                    "expect": q.expect,
                    "got": chosen,
                    "group": q.group,
                    "reason": decision.reason,
                }
            )
    return Report(
        n=len(queries),
        task_recall=right["task"][0] / max(1, right["task"][1]),
        open_world_precision=right["base"][0] / max(1, right["base"][1]),
        per_group={g: dict(c) for g, c in sorted(per_group.items())},
        route_ms_p50=statistics.median(times) if times else 0.0,
        errors=errors,
    )


GRID = {
    "embedder": ["wordllama", "none"],
    "C": ["1", "10", "100"],
    "char_weight": ["0.5", "1.0", "2.0"],
    "word_weight": ["0", "0.5", "1.0"],
    "image_weight": ["0", "0.5", "1.0", "2.0"],
    "threshold": ["0.3", "0.4", "0.5", "0.6", "0.7"],
}
CHOSEN = ("embedder", "C", "char_weight", "word_weight", "image_weight", "threshold")


def choose_options(
    base_dir: Path, cards: list[TaskCard], val: list[Labeled], open_world: Path, log=print
) -> tuple[dict[str, str], list[dict]]:
    """The auto router's options that maximise min(task recall, open-world precision) on the *validation* split.

    Ties (to two decimals) go to the earlier grid point. Image evidence does not depend on the text options:
    computed once and reused.
    """
    from deltaserve.server.router_auto import combine, decide

    first = make_router(base_dir, cards, {"open_world": str(open_world)})
    evidence = [first.image_evidence(q.query) for q in val]
    rows = []
    for embedder in GRID["embedder"]:
        for C in GRID["C"]:
            for char_weight, word_weight in itertools.product(GRID["char_weight"], GRID["word_weight"]):
                text_options = {"embedder": embedder, "C": C, "char_weight": char_weight, "word_weight": word_weight}
                router = make_router(base_dir, cards, {**text_options, "open_world": str(open_world)})
                text = router.text_scores([q.query.text for q in val])
                for image_weight in GRID["image_weight"]:
                    scores = [combine(t, e.ratios, float(image_weight)) for t, e in zip(text, evidence, strict=True)]
                    for threshold in GRID["threshold"]:
                        hits = {"task": [0, 0], "base": [0, 0]}
                        for q, s, e in zip(val, scores, evidence, strict=True):
                            chosen = decide(s, e.closed, float(threshold)).expert or BASE
                            bucket = hits["base" if q.expect == BASE else "task"]
                            bucket[0] += chosen == q.expect
                            bucket[1] += 1
                        recall, precision = hits["task"][0] / hits["task"][1], hits["base"][0] / hits["base"][1]
                        rows.append(
                            {
                                **text_options,
                                "image_weight": image_weight,
                                "threshold": threshold,
                                "recall": recall,
                                "precision": precision,
                            }
                        )
    # The worse of the two rates, to two decimals (one validation request is 0.005 of a class):
    # equal scores go to the earlier grid point — max() keeps the first — so the semantic
    # embedder, listed first, wins ties.
    best = max(rows, key=lambda r: round(min(r["recall"], r["precision"]), 2))
    log(f"chosen on validation: {best}")
    return {k: best[k] for k in CHOSEN}, rows


def build_base_dir(work_dir: Path) -> tuple[Path, str]:
    """The pretrained base if it is cached, else a random-init base built in ``work_dir``."""
    from deltaserve.tuning.pretrain import cached_base

    pretrained = cached_base()
    if pretrained is not None:
        return pretrained, "pretrained"
    from deltaserve.tuning.base.factory import build_base

    return build_base(Path(work_dir) / "tiny-llava", seed=0), "random-init"


def scratch_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="deltaserve-routing-"))
