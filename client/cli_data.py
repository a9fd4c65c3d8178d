"""``deltaserve data …``: generate the synthetic world's task data (the format users bring their own data in)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


@click.group()
def data() -> None:
    """Generate and check task data (JSONL + images)."""


@data.command("build")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write (must not exist or be empty).",
)
@click.option(
    "--seed", default=0, show_default=True, help="World seed: scenes, renders, phrasings and split assignment."
)
@click.option(
    "--general-train",
    default=None,
    type=click.IntRange(min=1),
    help="Training samples per general task (default: the world's default).",
)
@click.option(
    "--downstream-train", default=None, type=click.IntRange(min=1), help="Training samples per downstream task."
)
@click.option("--val", default=None, type=click.IntRange(min=1), help="Validation samples per task.")
@click.option("--test", default=None, type=click.IntRange(min=1), help="Test samples per task.")
def build(
    out: Path, seed: int, general_train: int | None, downstream_train: int | None, val: int | None, test: int | None
) -> None:
    """Write every world task (general and downstream) as task directories under --out."""
    from dataclasses import replace

    from deltaserve.tuning.cache import atomic_dir
    from deltaserve.tuning.world import WorldConfig, build_world

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise click.UsageError(f"`--out` {out} exists and is not empty")
    sizes = {"general_train": general_train, "downstream_train": downstream_train, "val": val, "test": test}
    config = replace(WorldConfig(seed=seed), **{k: v for k, v in sizes.items() if v is not None})
    started = time.perf_counter()
    with atomic_dir(out) as tmp:
        written = build_world(tmp, config)
    counts = {
        name: {s: sum(1 for _ in (out / name / f"{s}.jsonl").open()) for s in ("train", "val", "test")}
        for name in written
    }
    click.echo(json.dumps({"out": str(out), "tasks": counts, "seconds": round(time.perf_counter() - started, 2)}))


@data.command("check")
@click.argument("task_dirs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
def check(task_dirs: tuple[Path, ...]) -> None:
    """Validate task directories; print sample counts, or every problem with file and line."""
    from deltaserve.tuning.data import load_task
    from deltaserve.tuning.errors import DataError

    report, failed = {}, []
    for task_dir in task_dirs:
        try:
            task = load_task(task_dir)
        except DataError as e:
            failed.append(str(e))
            continue
        report[task.name] = {split: len(samples) for split, samples in task.splits.items()}
    if failed:
        raise click.ClickException("\n".join(failed))
    click.echo(json.dumps(report))
