"""``deltaserve tune``, ``deltaserve eval`` and ``deltaserve bench tuning``: offline tuning from the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

# The names of deltaserve.tuning.methods.METHODS, spelled out so `--help` needs no torch import
# (a test keeps the two equal).
METHOD_NAMES = ("spider", "magnitude", "full", "lora", "bottleneck")


def _fail(exc: Exception) -> click.ClickException:
    return click.ClickException(str(exc))


@click.command("tune")
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Base model directory (e.g. from `deltaserve base pretrain`).",
)
@click.option(
    "--data",
    "task_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Task directory: task.json, train/val/test.jsonl, images/.",
)
@click.option("--method", required=True, type=click.Choice(METHOD_NAMES), help="Tuning method.")
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Bundle directory to write (must not exist or be empty).",
)
@click.option("--name", default=None, help="Task name in the bundle (default: the task's name).")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Optimizer steps  [default: 500]")
@click.option(
    "--lr", default=None, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate  [default: 3e-3]"
)
@click.option("--batch-size", default=None, type=click.IntRange(min=1), help="Samples per step  [default: 16]")
@click.option("--seed", default=0, show_default=True, help="Seeds new modules' init and the batch order.")
@click.option(
    "--last-n-layers",
    default=None,
    type=click.IntRange(min=0),
    help="Decoder layers (from the top) in the trainable scope  [default: 2]",
)
@click.option("--train-vision-tower", is_flag=True, help="Tune the vision tower too (selective methods).")
@click.option(
    "--general-data",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of general task dirs for the general score  [default: the embedded world's]",
)
@click.option(
    "--augment-copies",
    default=None,
    type=click.IntRange(min=0, max=8),
    help="Reworded copies of every training prompt, for wordings the task data does not have  [default: 0]",
)
@click.option(
    "--lora-rank",
    default=None,
    type=click.IntRange(min=1, max=256),
    help="`lora`: rank r of the factors; alpha is 2r, as in the default r=8, alpha=16  [default: 8]",
)
@click.option(
    "--bottleneck-width",
    default=None,
    type=click.IntRange(min=1, max=4096),
    help="`bottleneck`: width of the adapters' down projection  [default: 32]",
)
@click.option("--no-general", is_flag=True, help="Skip the general score.")
@click.option(
    "--eval-limit", default=None, type=click.IntRange(min=1), help="Score on at most N test samples per task."
)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def tune(
    base_dir,
    task_dir,
    method,
    out,
    name,
    steps,
    lr,
    batch_size,
    seed,
    last_n_layers,
    train_vision_tower,
    general_data,
    augment_copies,
    lora_rank,
    bottleneck_width,
    no_general,
    eval_limit,
    quiet,
) -> None:
    """Tune a delta for one task and write it as a bundle (nothing is written on error)."""
    from dataclasses import replace

    from deltaserve.plugins.errors import DeltaServeError
    from deltaserve.tuning.tune import TuneConfig
    from deltaserve.tuning.tune import tune as run_tune

    overrides = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "last_n_layers": last_n_layers,
        "eval_limit": eval_limit,
        "augment_copies": augment_copies,
    }
    config = replace(
        TuneConfig(seed=seed, train_vision_tower=train_vision_tower),
        **{k: v for k, v in overrides.items() if v is not None},
    )
    options = {
        **({"lora_r": lora_rank, "lora_alpha": 2.0 * lora_rank} if lora_rank is not None else {}),
        **({"bottleneck_dim": bottleneck_width} if bottleneck_width is not None else {}),
    }
    if options:
        config = replace(config, options=replace(config.options, **options))
    try:
        result = run_tune(
            base_dir,
            task_dir,
            method,
            out,
            config,
            name=name,
            general_dir=general_data,
            evaluate_general=not no_general,
            progress=not quiet,
        )
    except (DeltaServeError, ValueError, FileExistsError) as e:
        raise _fail(e) from None
    report = {
        "out": str(result.path),
        "method": method,
        "metrics": result.metrics,
        "stats": result.stats,
        "seconds": result.seconds,
        "step_seconds": round(result.step_seconds, 4),
    }
    click.echo(json.dumps(report))


@click.command("eval")
@click.option(
    "--base",
    "base_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Base model directory the bundle was tuned from.",
)
@click.option(
    "--bundle",
    "bundle_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Delta bundle directory.",
)
@click.option(
    "--data",
    "task_dirs",
    required=True,
    multiple=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Task directory to score (repeatable).",
)
@click.option(
    "--general-data",
    default=None,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of general task dirs  [default: the embedded world's]",
)
@click.option("--no-general", is_flag=True, help="Skip the general score.")
@click.option(
    "--eval-limit", default=None, type=click.IntRange(min=1), help="Score on at most N test samples per task."
)
def eval_cmd(base_dir, bundle_dir, task_dirs, general_data, no_general, eval_limit) -> None:
    """Apply a bundle to the base through its kind and report target / general / H."""
    from deltaserve.plugins.errors import DeltaServeError
    from deltaserve.tuning.tune import evaluate_bundle

    try:
        report = evaluate_bundle(
            base_dir,
            bundle_dir,
            list(task_dirs),
            general_dir=general_data,
            evaluate_general=not no_general,
            limit=eval_limit,
        )
    except (DeltaServeError, ValueError) as e:
        raise _fail(e) from None
    click.echo(json.dumps(report))


@click.group()
def bench() -> None:
    """Benchmarks (figures, not pass/fail)."""


@bench.command("tuning", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def bench_tuning(ctx: click.Context) -> None:
    """Every tuning method × downstream task → docs/tuning-results.{md,png,json} (runs bench/tuning.py)."""
    import runpy

    import deltaserve.tuning

    script = Path(deltaserve.tuning.__file__).resolve().parents[1] / "bench" / "tuning.py"
    if not script.is_file():
        raise click.ClickException(
            f"{script} not found: the benchmark is part of the source checkout (run `python bench/tuning.py` there)"
        )
    sys.argv = [str(script), *ctx.args]
    runpy.run_path(str(script), run_name="__main__")
