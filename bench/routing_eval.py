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
validation split and on phrasing folds of the training split (:func:`choice_sets`,
:func:`choose_options`).
"""

from __future__ import annotations

import itertools
import json
import random
import re
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
    "embedder": ["minilm", "wordllama", "none"],
    "C": ["1", "10", "100"],
    "char_weight": ["0.5", "1.0", "2.0"],
    "word_weight": ["0", "0.5", "1.0"],
    "image_weight": ["0", "0.5", "1.0", "2.0"],
    "threshold": ["0.3", "0.4", "0.5", "0.6", "0.7"],
}
CHOSEN = ("embedder", "C", "char_weight", "word_weight", "image_weight", "threshold")


@dataclass
class ChoiceSet:
    """Labelled requests and what the router knows when it meets them: the task cards and the base's examples."""

    label: str
    cards: list[TaskCard]
    open_world: Path
    queries: list[Labeled]


def _phrasings() -> dict[str, tuple[str, ...]]:
    """Each world task's phrasing templates (``{slot}`` placeholders)."""
    from deltaserve.tuning.world import digits, general, relations, text

    return {
        "digits": digits.PROMPTS,
        "relations": relations.PROMPTS,
        "caption": general.CAPTION_PROMPTS,
        "colour": general.COLOUR_PROMPTS,
        "count": general.COUNT_PROMPTS,
        "position": general.POSITION_PROMPTS,
        "arithmetic": text.PLUS_PROMPTS + text.MINUS_PROMPTS,
        "opposites": text.OPPOSITE_PROMPTS,
    }


def phrasing_groups(task: str, samples: list) -> dict[str, list]:
    """``samples`` by the phrasing template their prompt was written from."""
    patterns = [
        (t, re.compile("^" + re.sub(r"\\\{\w+\\\}", "(.+?)", re.escape(t)) + "$", re.DOTALL))
        for t in _phrasings()[task]
    ]
    groups: dict[str, list] = defaultdict(list)
    for s in samples:
        template = next((t for t, rx in patterns if rx.match(s.prompt)), None)
        if template is None:
            raise ValueError(f"{task}: prompt {s.prompt!r} matches none of the task's phrasings")
        groups[template].append(s)
    return groups


def choice_sets(
    downstream_root: Path,
    general_root: Path,
    val: list[Labeled],
    work: Path,
    folds: int = 3,
    per_task: int = 40,
    seed: int = 0,
) -> list[ChoiceSet]:
    """What options are chosen on: the validation split (cards and base examples as served), and
    ``folds`` folds of the *training* split by phrasing — in fold k a third of every task's training
    phrasings is held out of the cards and of the base's examples, and ``per_task`` requests worded
    in them are asked. The validation split holds only ≈ 5 phrasings per task; the folds add every
    training phrasing as an unseen one once. Test split and hand-written sets are never used."""
    from deltaserve.tuning.data import load_tasks, pick_examples
    from deltaserve.tuning.pretrain import OPEN_WORLD_EXAMPLES, OPEN_WORLD_FILE, open_world_examples, write_open_world

    down = load_tasks(downstream_root, type="downstream", splits=("train",))
    gen = load_tasks(general_root, type="general", splits=("train",))
    sets = [ChoiceSet("val", task_cards(downstream_root, 24, seed), open_world_file(general_root, work, seed), val)]
    grouped = {name: phrasing_groups(name, t["train"]) for name, t in {**down, **gen}.items()}
    for k in range(folds):
        kept, asked = {}, []
        for name, groups in grouped.items():
            order = sorted(groups)
            random.Random(f"routing-folds\0{name}\0{seed}").shuffle(order)
            held = set(order[k::folds])
            kept[name] = [s for t in order if t not in held for s in groups[t]]
            out = [s for t in sorted(held) for s in groups[t]]
            random.Random(f"routing-fold-queries\0{name}\0{k}").shuffle(out)
            expect = name if name in down else BASE
            asked += [
                Labeled(RouteQuery(s.prompt, s.load_image() if s.image is not None else None), expect, f"fold:{name}")
                for s in out[:per_task]
            ]
        cards = [
            TaskCard(
                name,
                "lora",
                down[name].info.description,
                [
                    (s.prompt, s.load_image() if s.image is not None else None)
                    for s in pick_examples(kept[name], 24, seed)
                ],
            )
            for name in sorted(down)
        ]
        fold_dir = Path(work) / f"fold-{k}"
        fold_dir.mkdir(parents=True, exist_ok=True)
        ow = write_open_world(
            fold_dir / OPEN_WORLD_FILE,
            open_world_examples({n: {"train": kept[n]} for n in gen}, OPEN_WORLD_EXAMPLES, seed),
        )
        sets.append(ChoiceSet(f"fold-{k}", cards, ow, asked))
    return sets


def choose_options(base_dir: Path, sets: list[ChoiceSet], log=print) -> tuple[dict[str, str], list[dict]]:
    """The auto router's options that maximise min(task recall, open-world precision) over ``sets`` pooled.

    Ties (to two decimals) go to the earlier grid point. Image evidence does not depend on the text
    options: computed once per set and reused; text scores come from routers without images.
    """
    from deltaserve.server.router_auto import combine, decide

    evidence = []
    for st in sets:
        first = make_router(base_dir, st.cards, {"open_world": str(st.open_world)})
        evidence.append([first.image_evidence(q.query) for q in st.queries])
    rows = []
    for embedder in GRID["embedder"]:
        for C in GRID["C"]:
            for char_weight, word_weight in itertools.product(GRID["char_weight"], GRID["word_weight"]):
                text_options = {"embedder": embedder, "C": C, "char_weight": char_weight, "word_weight": word_weight}
                text = []
                for st in sets:
                    router = make_router(
                        base_dir,
                        st.cards,
                        {**text_options, "open_world": str(st.open_world), "image_weight": "0", "image_gate": "off"},
                    )
                    text.append(router.text_scores([q.query.text for q in st.queries]))
                for image_weight in GRID["image_weight"]:
                    scores = [
                        [combine(t, e.ratios, float(image_weight)) for t, e in zip(ts, es, strict=True)]
                        for ts, es in zip(text, evidence, strict=True)
                    ]
                    for threshold in GRID["threshold"]:
                        hits = {"task": [0, 0], "base": [0, 0]}
                        for st, ss, es in zip(sets, scores, evidence, strict=True):
                            for q, s, e in zip(st.queries, ss, es, strict=True):
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
        log(f"  grid: embedder {embedder} done ({len(rows)} points)")
    # The worse of the two rates, to two decimals: equal scores go to the earlier grid point —
    # max() keeps the first — so the semantic embedders, listed first, win ties.
    best = max(rows, key=lambda r: round(min(r["recall"], r["precision"]), 2))
    log(f"chosen: {best}")
    return {k: best[k] for k in CHOSEN}, rows


def router_base_dir(base_dir: Path, work: Path) -> Path:
    """``base_dir`` without its ``deltaserve-open-world`` examples (links to every other file): the
    evaluation passes each set's base examples itself, so held-out phrasings cannot leak in."""
    from deltaserve.server.router_auto import BASE_OPEN_WORLD_FILE

    view = Path(work) / "base-view"
    view.mkdir(parents=True, exist_ok=True)
    for f in Path(base_dir).iterdir():
        if not f.name.startswith(Path(BASE_OPEN_WORLD_FILE).stem):
            (view / f.name).symlink_to(f)
    return view


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
