"""Routing accuracy of the ``auto`` router: held-out phrasings, hand-written paraphrases, hand-written open-world requests.

::

    .venv/bin/python bench/routing.py [--out docs/]

1. Builds (or reuses) the tuning world and the base (the pretrained base when
   ``deltaserve.tuning.pretrain.cached_base()`` has one, else a random-init base); registers
   the two downstream tasks with the 24 training examples ``deltaserve tune`` puts in a bundle.
2. Chooses the auto router's options on the world's **validation** split (held-out
   phrasings) and on three phrasing folds of the *training* split
   (:func:`routing_eval.choice_sets`, :func:`routing_eval.choose_options`).
3. Measures, with those options and with the other candidates (the old ``coverage`` router,
   each text embedder, without images): the test
   split's held-out phrasings; ``bench/routing_sets/paraphrases.jsonl``;
   ``bench/routing_sets/open_world.jsonl``. The hand-written sets choose nothing.
4. Times ``route()`` with 16 registered tasks (p50 over the test split's requests).

Writes ``<out>/routing-results.md`` and ``.json``; exits 1 when the chosen router misses a target
(held-out phrasings ≥ 0.95 / ≥ 0.95, hand-written ≥ 0.90 / ≥ 0.95, ≤ 3 ms p50).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import routing_eval as E  # noqa: E402

TARGETS = {
    "split_recall": 0.95,
    "split_precision": 0.95,
    "hand_recall": 0.90,
    "hand_precision": 0.95,
    "ms_p50_16_tasks": 3.0,
}


def sixteen_tasks(down: Path, gen: Path) -> list:
    """16 registered tasks for the timing: every world task as an expert, twice (two example draws)."""
    from deltaserve.server.routing import TaskCard
    from deltaserve.tuning.data import load_tasks, pick_examples

    tasks = {
        **load_tasks(down, type="downstream", splits=("train",)),
        **load_tasks(gen, type="general", splits=("train",)),
    }
    cards = []
    for draw in (0, 1):
        for name, task in sorted(tasks.items()):
            examples = [(s.prompt, s.load_image() if s.image else None) for s in pick_examples(task["train"], 24, draw)]
            cards.append(TaskCard(f"{name}-{draw}", "lora", task.info.description, examples))
    return cards


def route_ms(router, queries) -> float:
    times = []
    for q in queries:
        started = time.perf_counter()
        router.route(q.query)
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    down, gen = E.world_dirs()
    work = E.scratch_dir()
    full_base, base_kind = E.build_base_dir(work)
    base = E.router_base_dir(full_base, work)  # every set passes its own base examples
    val = E.split_queries(down, gen, "val")
    sets = E.choice_sets(down, gen, val, work)
    cards, open_world = sets[0].cards, sets[0].open_world  # what the server gets: the bundles' examples, the base's
    test = E.split_queries(down, gen, "test")
    pools = E.image_pools(down, gen)
    hand = E.set_queries(E.SETS / "paraphrases.jsonl", pools) + E.set_queries(E.SETS / "open_world.jsonl", pools)

    chosen, grid = E.choose_options(base, sets)
    ow = {"open_world": str(open_world)}
    candidates = {
        "auto (chosen on validation)": ("auto", {**chosen, **ow}),
        "auto, no image evidence (gate only)": ("auto", {**chosen, **ow, "image_weight": "0"}),
        "auto, no image gate or evidence": ("auto", {**chosen, **ow, "image_weight": "0", "image_gate": "off"}),
        "auto, n-grams + MiniLM embedding": ("auto", {**chosen, **ow, "embedder": "minilm"}),
        "auto, n-grams + WordLlama embedding": ("auto", {**chosen, **ow, "embedder": "wordllama"}),
        "auto, n-grams only": ("auto", {**chosen, **ow, "embedder": "none"}),
        "auto, MiniLM embedding only": (
            "auto",
            {**chosen, **ow, "embedder": "minilm", "char_weight": "0", "word_weight": "0"},
        ),
        "auto, WordLlama embedding only": (
            "auto",
            {**chosen, **ow, "embedder": "wordllama", "char_weight": "0", "word_weight": "0"},
        ),
        "coverage (the previous auto router)": ("coverage", {}),
    }
    results = {}
    for label, (name, options) in candidates.items():
        router = E.make_router(base, cards, options, name=name)
        results[label] = {
            "router": name,
            "options": options,
            "test": E.evaluate(router, test).to_json(),
            "hand": E.evaluate(router, hand).to_json(),
        }
        r = results[label]
        print(
            f"{label:42s} test {r['test']['task_recall']:.3f}/{r['test']['open_world_precision']:.3f}  "
            f"hand {r['hand']['task_recall']:.3f}/{r['hand']['open_world_precision']:.3f}  {r['test']['route_ms_p50']:.2f} ms",
            flush=True,
        )

    many = E.make_router(base, sixteen_tasks(down, gen), {**chosen, **ow})
    ms16 = route_ms(many, test)
    main_result = results["auto (chosen on validation)"]
    figures = {
        "split_recall": main_result["test"]["task_recall"],
        "split_precision": main_result["test"]["open_world_precision"],
        "hand_recall": main_result["hand"]["task_recall"],
        "hand_precision": main_result["hand"]["open_world_precision"],
        "ms_p50_16_tasks": ms16,
    }
    passed = {k: (v <= TARGETS[k] if k.startswith("ms") else v >= TARGETS[k]) for k, v in figures.items()}
    result = {
        "base": {"path": str(base), "kind": base_kind},
        "chosen": chosen,
        "figures": figures,
        "targets": TARGETS,
        "passed": passed,
        "candidates": results,
        "validation_grid_top": sorted(grid, key=lambda r: -min(r["recall"], r["precision"]))[:10],
        "counts": {
            "val": len(val),
            "folds": sum(len(st.queries) for st in sets[1:]),
            "test": len(test),
            "hand": len(hand),
        },
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average": os.getloadavg()},
        "seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "routing-results.json").write_text(json.dumps(result, indent=1, default=str) + "\n", encoding="utf-8")
    (args.out / "routing-results.md").write_text(markdown(result), encoding="utf-8")
    print(
        json.dumps(figures), "passed" if all(passed.values()) else f"MISSED {[k for k, ok in passed.items() if not ok]}"
    )
    return 0 if all(passed.values()) else 1


def _confusion(report: dict, prefix: str) -> list[str]:
    groups = {g: c for g, c in report["per_group"].items() if g.startswith(prefix)}
    columns = sorted({col for c in groups.values() for col in c})
    lines = ["| group | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    lines += [f"| {g} | " + " | ".join(str(c.get(col, 0)) for col in columns) + " |" for g, c in groups.items()]
    return lines


def markdown(result: dict) -> str:
    main = result["candidates"]["auto (chosen on validation)"]
    lines = [
        "# Routing results",
        "",
        f"Generated by `.venv/bin/python bench/routing.py` in {result['seconds']} s on {result['machine']['cpus']} CPUs "
        f"(load average at the end {', '.join(f'{x:.1f}' for x in result['machine']['load_average'])}); raw: [routing-results.json](routing-results.json).",
        f"Base: {result['base']['kind']} (its vision tower gives the image features). Registered: `digits`, `relations` with the 24 training",
        "examples `deltaserve tune` stores in a bundle; the base's open-world examples: the built-in corpus",
        "(`server/data/open_world.txt`) and 24 training prompts of each general task (what `deltaserve base pretrain` writes).",
        "",
        f"Options chosen on the validation split (held-out phrasings, {result['counts']['val']} requests) and three phrasing folds of the training split "
        f"({result['counts']['folds']} requests; in each fold a third of every task's training phrasings is held out of the router's examples), "
        f"by the best min(task recall, open-world precision): `{json.dumps(result['chosen'])}`.",
        "",
        "## Candidates",
        "",
        "task recall / open-world precision (requests meant for the base that reached it); ms: p50 of `route()` with 2 tasks.",
        "",
        f"| router | test split, held-out phrasings ({result['counts']['test']}) | hand-written paraphrases + open world ({result['counts']['hand']}) | ms p50 |",
        "|---|---:|---:|---:|",
    ]
    for label, r in result["candidates"].items():
        lines.append(
            f"| {label} | {r['test']['task_recall']:.3f} / {r['test']['open_world_precision']:.3f} | "
            f"{r['hand']['task_recall']:.3f} / {r['hand']['open_world_precision']:.3f} | {r['test']['route_ms_p50']:.2f} |"
        )
    f = result["figures"]
    lines += [
        "",
        "## Targets (chosen router)",
        "",
        "| figure | measured | target | met |",
        "|---|---:|---:|---|",
    ]
    for k, v in f.items():
        lines.append(f"| {k} | {v:.3f} | {result['targets'][k]} | {'yes' if result['passed'][k] else '**no**'} |")
    lines += [
        "",
        "`ms_p50_16_tasks`: p50 of `route()` over the test split's requests with 16 registered tasks.",
        "",
        "## Confusion (chosen router)",
        "",
        "Hand-written sets, by style:",
        "",
    ]
    lines += _confusion(main["hand"], "")
    lines += ["", "Test split, by task:", ""]
    lines += _confusion(main["test"], "split:")
    lines += ["", "## Errors of the chosen router on the hand-written sets (up to 40)", ""]
    lines += [
        f"- `{e['group']}` {json.dumps(e['text'], ensure_ascii=False)} (image: {e['image']}) → `{e['got']}`"
        for e in main["hand"]["errors"]
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
