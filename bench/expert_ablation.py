"""Ablation of the tuning recipe ("experts that learn", issue 13), scored on the VALIDATION splits.

    .venv/bin/python bench/expert_ablation.py --variants default,lr1e-3 --tasks digits --methods spider

Each *variant* is a set of :class:`deltaserve.tuning.tune.TuneConfig` overrides (see ``VARIANTS``),
applied alike to every method (one budget for all methods). For every variant × task × method it
tunes in memory (no bundle is written) and scores:

- **val target** — exact match on the downstream task's ``val`` split (all of it);
- **val general** — mean over the general tasks' ``val`` splits (first ``--general-limit`` samples of each,
  each by its own metric), what the base knew;
- **train s** — wall time of the optimizer steps.

Test splits are never read. Rows are appended to ``--jsonl`` as they finish (a long ablation can be
stopped and resumed: finished rows are skipped), and ``--md`` gets the table of every row so far.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict] = {
    "default": {},
    "lr1e-3": {"lr": 1e-3},
    "lr3e-4": {"lr": 3e-4},
    "steps1000": {"steps": 1000},
    "layers4": {"last_n_layers": 4},
    "vision": {"train_vision_tower": True},
    "vision+lr1e-3": {"train_vision_tower": True, "lr": 1e-3},
    "layers4+lr1e-3": {"last_n_layers": 4, "lr": 1e-3},
    "vision+layers4+lr1e-3": {"train_vision_tower": True, "last_n_layers": 4, "lr": 1e-3},
    "head": {"train_lm_head": True},
    "head+lr1e-3": {"train_lm_head": True, "lr": 1e-3},
    "head+layers4+lr1e-3": {"train_lm_head": True, "last_n_layers": 4, "lr": 1e-3},
    "head+layers4": {"train_lm_head": True, "last_n_layers": 4},
    "head+vision": {"train_lm_head": True, "train_vision_tower": True},
    "head+steps1000": {"train_lm_head": True, "steps": 1000},
    "vision+layers4": {"train_vision_tower": True, "last_n_layers": 4},
    "head+vision+layers4": {"train_lm_head": True, "train_vision_tower": True, "last_n_layers": 4},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--variants", default="default", help="comma-separated names of VARIANTS, or inline JSON overrides name=json"
    )
    p.add_argument("--tasks", default="digits,relations")
    p.add_argument("--methods", default="spider,magnitude,full,lora,bottleneck")
    p.add_argument("--general-limit", type=int, default=50, help="val samples per general task (default 50)")
    p.add_argument("--jsonl", type=Path, default=ROOT / "docs" / "expert-ablation.jsonl")
    p.add_argument("--md", type=Path, default=None, help="write the table of every row of --jsonl here")
    p.add_argument(
        "--pretrain",
        default="{}",
        help="PretrainConfig overrides as JSON for the base tuned on (pretrained and cached first if need be); "
        "rows of different bases belong in different --jsonl files",
    )
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def variant(spec: str) -> tuple[str, dict]:
    if "=" in spec:
        name, js = spec.split("=", 1)
        return name, json.loads(js)
    return spec, VARIANTS[spec]


DATA_OPTIONS = ("digit_words",)
"""Overrides that change the task data instead of TuneConfig: ``digit_words`` answers digits with the
number words the base already emits (``"seven"`` for ``"7"``), train and val alike."""
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def run_one(base_dir: Path, task: str, method: str, config, general, progress: bool, digit_words: bool = False) -> dict:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from deltaserve.tuning import augment, batching, data, evaluate, train
    from deltaserve.tuning.methods import get_method
    from deltaserve.tuning.tune import world_task_dir

    t = data.load_task(world_task_dir(task), splits=("train", "val"))
    if digit_words and task == "digits":
        from dataclasses import replace as _replace

        t = {split: [_replace(s, target=NUMBER_WORDS[int(s.target)]) for s in t[split]] for split in ("train", "val")}
    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32)
    processor = AutoProcessor.from_pretrained(str(base_dir))
    items = batching.encode(processor, t["train"] + augment.augmented(t["train"], config.augment_copies, config.seed))
    torch.manual_seed(config.seed)
    tuner = get_method(method)(config.scope(), config.options)
    train_model, hooks = tuner.prepare(model)
    started = time.perf_counter()
    result = train.train(
        train_model, processor, items, config.train_config(method), hooks, progress=progress, desc=f"{method}:{task}"
    )
    tuner.finalize(base_dir)
    trained = time.perf_counter()
    model.eval()
    target = evaluate.evaluate(model, processor, t["val"])["exact_match"]
    scores = evaluate.evaluate_tasks(model, processor, general["samples"], metrics=general["metrics"])
    stats = tuner.stats()
    return {
        "task": task,
        "method": method,
        "val_target": round(target, 4),
        "val_general": round(evaluate.general_score(scores), 4),
        "val_general_by_task": {k: round(v, 4) for k, v in scores.items()},
        "train_seconds": round(trained - started, 1),
        "eval_seconds": round(time.perf_counter() - trained, 1),
        "loss_first": round(sum(result.losses[:10]) / 10, 4),
        "loss_last": round(sum(result.losses[-10:]) / 10, 4),
        "trainable_params": result.trainable_parameters,
        "density": stats.get("density"),
    }


def base_row(base_dir: Path, tasks, general) -> list[dict]:
    import torch
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from deltaserve.tuning import data, evaluate
    from deltaserve.tuning.tune import world_task_dir

    model = LlavaForConditionalGeneration.from_pretrained(str(base_dir), dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(str(base_dir))
    scores = evaluate.evaluate_tasks(model, processor, general["samples"], metrics=general["metrics"])
    rows = []
    for task in tasks:
        val = data.load_task(world_task_dir(task), splits=("val",))["val"]
        rows.append(
            {
                "variant": "(base)",
                "overrides": {},
                "task": task,
                "method": "–",
                "val_target": round(evaluate.evaluate(model, processor, val)["exact_match"], 4),
                "val_general": round(evaluate.general_score(scores), 4),
                "val_general_by_task": scores,
                "train_seconds": 0.0,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    out = [
        "| option | method | digits val target | relations val target | val general (digits / relations run) | train s (digits / relations) |",
        "|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        groups.setdefault((r["variant"], r["method"]), {})[r["task"]] = r
    for (name, method), by_task in groups.items():
        d, rel = by_task.get("digits"), by_task.get("relations")

        def f(r, k):
            return "–" if r is None else (f"{r[k]:.3f}" if isinstance(r[k], float) else str(r[k]))

        out.append(
            f"| {name} | {method} | {f(d, 'val_target')} | {f(rel, 'val_target')} | {f(d, 'val_general')} / {f(rel, 'val_general')} | {f(d, 'train_seconds')} / {f(rel, 'train_seconds')} |"
        )
    return "\n".join(out)


def main(argv=None):
    args = parse_args(argv)
    from deltaserve.tuning import data
    from deltaserve.tuning.pretrain import PretrainConfig, pretrain
    from deltaserve.tuning.tune import TuneConfig, default_general_dir

    base_dir = pretrain(PretrainConfig(**json.loads(args.pretrain)), progress=not args.quiet).path
    gtasks = data.load_tasks(default_general_dir(), type="general", splits=("val",))
    general = {
        "samples": {n: t["val"][: args.general_limit] for n, t in gtasks.items()},
        "metrics": {n: t.info.metric for n, t in gtasks.items()},
    }
    done = []
    if args.jsonl.is_file():
        done = [json.loads(line) for line in args.jsonl.read_text().splitlines() if line.strip()]
    seen = {(r["variant"], r["task"], r["method"]) for r in done}
    tasks = args.tasks.split(",")
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)
    with args.jsonl.open("a") as log:
        if not any(r["variant"] == "(base)" for r in done):
            for r in base_row(base_dir, tasks, general):
                log.write(json.dumps(r) + "\n")
                done.append(r)
            log.flush()
        for spec in args.variants.split(";" if "=" in args.variants else ","):
            name, overrides = variant(spec)
            config = replace(TuneConfig(), **{k: v for k, v in overrides.items() if k not in DATA_OPTIONS})
            for task in tasks:
                for method in args.methods.split(","):
                    if (name, task, method) in seen:
                        continue
                    print(f"[ablation] {name} {overrides} × {task} × {method}", file=sys.stderr, flush=True)
                    row = {
                        "variant": name,
                        "overrides": overrides,
                        **run_one(
                            base_dir,
                            task,
                            method,
                            config,
                            general,
                            not args.quiet,
                            digit_words=overrides.get("digit_words", False),
                        ),
                    }
                    print(json.dumps(row), file=sys.stderr, flush=True)
                    log.write(json.dumps(row) + "\n")
                    log.flush()
                    done.append(row)
    print(table(done))
    if args.md:
        args.md.write_text(table(done) + "\n")


if __name__ == "__main__":
    main()
