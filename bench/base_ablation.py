"""Ablation of the embedded base's pretraining: which option lets the vision path learn?

Each option is a set of overrides of :class:`~deltaserve.tuning.pretrain.PretrainConfig`
(dotted names reach into ``base`` and ``world``). Every run trains a fresh base with
:func:`~deltaserve.tuning.pretrain.train_base` (uncached, same seed, same steps unless the
option says otherwise) and scores it on the general tasks' test splits. Results are
appended to a JSON file (one record per run, so interrupted sweeps keep what they measured)
and the Markdown table is rewritten from all records.

    python bench/base_ablation.py --steps 500 --options baseline,vision-lr-x3 \\
        --json docs/base-ablation.json --md docs/base-ablation.md
    python bench/base_ablation.py --md docs/base-ablation.md     # re-render the table only

Uses at most ``--threads`` torch threads (default 2).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import fields, replace
from pathlib import Path

_HALF = (0.5, 0.5, 0.5)

OPTIONS: dict[str, dict] = {
    # Names spell out the learning rate: the default changed from 3e-3 to 1e-3 after this ablation.
    "default": {},
    "lr-3e-3": {"lr": 3e-3},  # the first default
    "lr-1e-3": {"lr": 1e-3},
    "lr-5e-4": {"lr": 5e-4},
    # learning rate per part
    "lr-3e-3+vision-lr-x3": {"lr": 3e-3, "vision_lr_scale": 3.0, "projector_lr_scale": 3.0},
    "lr-3e-3+vision-lr-x0.33": {"lr": 3e-3, "vision_lr_scale": 0.3333, "projector_lr_scale": 0.3333},
    # processor normalisation: the world's images are dark, CLIP's mean/std centre them at about -1.3
    "lr-1e-3+norm-half": {"lr": 1e-3, "base.image_mean": _HALF, "base.image_std": _HALF},
    # tower shape and tokens
    "lr-1e-3+patch-4": {"lr": 1e-3, "base.patch_size": 4},
    # reworded copies of the training prompts (tuning/augment.py): phrasings never seen
    "augment-2": {"augment_copies": 2},
    "lr-1e-3+vision-hidden-128": {"lr": 1e-3, "base.vision_hidden": 128, "base.vision_heads": 4},
    "lr-1e-3+vision-layers-4": {"lr": 1e-3, "base.vision_layers": 4},
    "lr-1e-3+feature-layer--2": {"lr": 1e-3, "base.vision_feature_layer": -2},
    "lr-1e-3+init-0.05": {"lr": 1e-3, "initializer_range": 0.05},
    "lr-1e-3+batch-64": {"lr": 1e-3, "batch_size": 64},
}


def apply(config, overrides: dict):
    """``config`` with dotted overrides (``"base.patch_size": 4``) applied."""
    nested: dict[str, dict] = {}
    flat = {}
    for key, value in overrides.items():
        head, _, rest = key.partition(".")
        if rest:
            nested.setdefault(head, {})[rest] = value
        else:
            flat[key] = value
    for head, sub in nested.items():
        flat[head] = apply(getattr(config, head), sub)
    known = {f.name for f in fields(config)}
    unknown = set(flat) - known
    if unknown:
        raise SystemExit(f"unknown option field(s) {sorted(unknown)} for {type(config).__name__}")
    return replace(config, **flat)


def run(name: str, overrides: dict, steps: int | None, seed: int, split: str = "val") -> dict:
    from deltaserve.tuning.pretrain import PretrainConfig, train_base

    config = PretrainConfig(seed=seed)
    if steps is not None:
        config = replace(config, steps=steps)
    config = apply(config, overrides)
    started = time.perf_counter()
    _, _, _, meta = train_base(config, progress=False, eval_split=split)
    from deltaserve.tuning.world import WORLD_VERSION

    return {
        "option": name,
        "world": f"v{WORLD_VERSION}",
        "split": split,
        "overrides": {k: list(v) if isinstance(v, tuple) else v for k, v in overrides.items()},
        "steps": config.steps,
        "seed": seed,
        "exact_match": meta.get("exact_match", meta["scores"]),
        "token_f1": meta["token_f1"],
        "general": meta["general_score"],  # each task by its task.json metric (caption: token F1 since WORLD_VERSION 2)
        "final_loss": meta["final_loss"],
        "train_s": meta["seconds"]["train"],
        "total_s": round(time.perf_counter() - started, 1),
        "load_avg_5min": round(
            os.getloadavg()[1], 2
        ),  # the machine is shared: train_s is only comparable at similar load
    }


def table(records: list[dict]) -> str:
    tasks = sorted({t for r in records for t in r["exact_match"]})
    head = [
        "option",
        "world",
        "scored on",
        "steps",
        "seed",
        *tasks,
        "caption F1",
        "general (EM)",
        "general (caption F1)",
        "loss",
        "train s",
        "load",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in records:
        em = r["exact_match"]
        with_f1 = {**em, "caption": r["token_f1"].get("caption", em.get("caption", 0.0))}
        row = [
            r["option"],
            r.get("world", "v2"),  # records before the world column ran on world v2
            r.get("split", "test"),  # records before the split option were scored on test
            r["steps"],
            r["seed"],
            *(f"{em.get(t, 0):.2f}" for t in tasks),
            f"{with_f1.get('caption', 0):.2f}",
            f"{sum(em.values()) / len(em):.3f}",
            f"{sum(with_f1.values()) / len(with_f1):.3f}",
            f"{r['final_loss']:.3f}",
            f"{r['train_s']:.0f}",
            r.get("load_avg_5min", "–"),
        ]
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return "\n".join(lines)


_START, _END = "<!-- table: bench/base_ablation.py -->", "<!-- /table -->"


def write_md(path: Path, body: str) -> None:
    """Replace the table between the markers in ``path`` (the narrative around it is kept)."""
    text = path.read_text() if path.exists() else f"{_START}\n{_END}\n"
    if _START not in text:
        text = f"{text.rstrip()}\n\n{_START}\n{_END}\n"
    head, _, rest = text.partition(_START)
    _, _, tail = rest.partition(_END)
    path.write_text(f"{head}{_START}\n{body}\n{_END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--options",
        default="",
        help=f"comma-separated names from: {', '.join(OPTIONS)}; or ;-separated name=JSON overrides (dotted keys)",
    )
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the PretrainConfig default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--split", default="val", choices=("val", "test"), help="split scored (choose options on val, report test)"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("docs/base-ablation.json"))
    parser.add_argument(
        "--md", type=Path, default=None, help="also rewrite this Markdown table from all records of --json"
    )
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    records = json.loads(args.json.read_text()) if args.json.exists() else []
    if args.md and not args.options:  # only re-render the table from the records
        write_md(args.md, table(records))
    for spec in filter(None, args.options.split(";" if "=" in args.options else ",")):
        name, _, custom = spec.partition("=")
        overrides = json.loads(custom) if custom else OPTIONS[name]
        record = run(name, overrides, args.steps, args.seed, args.split)
        print(json.dumps(record), flush=True)
        records.append(record)
        args.json.write_text(json.dumps(records, indent=1) + "\n")
        if args.md:
            write_md(args.md, table(records))


if __name__ == "__main__":
    main()
