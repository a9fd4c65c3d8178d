"""``deltaserve demo`` (the work is in :mod:`deltaserve.client.demo`, imported when the command runs)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option(
    "--workdir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Server store and log (default: a temporary directory).",
)
@click.option("--tiny", is_flag=True, help="A tiny world and a few steps: the same path, fast (the answers are noise).")
@click.option(
    "--tune-steps",
    type=click.IntRange(min=1),
    default=None,
    help="Optimizer steps per delta (default: DemoConfig.tune_steps, 500).",
)
def demo(workdir: Path | None, tiny: bool, tune_steps: int | None) -> None:
    """Run the whole story: pretrain, tune three deltas, serve, register, query over gRPC and HTTP."""
    from deltaserve.client.demo import main

    main(workdir, tiny, tune_steps)
