"""``deltaserve base …``: build, pretrain and fingerprint the embedded default base."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click


def _arch_option(help: str):
    return click.option(
        "--arch",
        type=click.Choice(["llava", "qwen2_vl"]),  # deltaserve.tuning.base.factory.ARCHS (not imported: CLI start-up)
        default="llava",
        show_default=True,
        help=help,
    )


@click.group()
def base() -> None:
    """Build and inspect base models."""


@base.command("build")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write (must not exist or be empty).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the random initialisation.")
@_arch_option("Architecture: the tiny LLaVA (the embedded default) or a tiny Qwen2-VL.")
def build(out: Path, seed: int, arch: str) -> None:
    """Build the tiny random-init LLaVA (or Qwen2-VL) base (deterministic per seed)."""
    from deltaserve.plugins.fingerprint import fingerprint
    from deltaserve.tuning.base.factory import build_base

    if out.exists() and any(out.iterdir()):
        raise click.UsageError(f"`--out` {out} exists and is not empty")
    started = time.perf_counter()
    build_base(out, seed=seed, arch=arch)
    click.echo(
        json.dumps(
            {"out": str(out), "fingerprint": fingerprint(out), "seconds": round(time.perf_counter() - started, 2)}
        )
    )


@base.command("fingerprint")
@click.argument("base_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def fingerprint_cmd(base_dir: Path) -> None:
    """Print the content fingerprint of a base model directory."""
    from deltaserve.plugins.fingerprint import fingerprint

    click.echo(fingerprint(base_dir))


@base.command("pretrain")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory to write (must not exist or be empty).",
)
@click.option("--seed", default=0, show_default=True, help="Seed of the initialisation and the batch order.")
@click.option("--steps", default=None, type=click.IntRange(min=1), help="Optimizer steps (default: the tuned default).")
@_arch_option("Architecture: the tiny LLaVA (the embedded default) or a tiny Qwen2-VL, same recipe.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def pretrain(out: Path, seed: int, steps: int | None, arch: str, quiet: bool) -> None:
    """Pretrain the tiny base on the world's general tasks (cached by content hash)."""
    from dataclasses import replace

    from deltaserve.plugins.fingerprint import fingerprint
    from deltaserve.tuning.cache import copy_dir
    from deltaserve.tuning.pretrain import PretrainConfig
    from deltaserve.tuning.pretrain import pretrain as run_pretrain

    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise click.UsageError(f"`--out` {out} exists and is not empty")
    config = PretrainConfig(seed=seed)
    if arch != "llava":
        from deltaserve.tuning.base.factory import default_sizes

        config = replace(config, base=default_sizes(arch))
    if steps is not None:
        config = replace(config, steps=steps)
    started = time.perf_counter()
    result = run_pretrain(config, progress=not quiet)
    copy_dir(result.path, out)
    meta = result.meta
    click.echo(
        json.dumps(
            {
                "out": str(out),
                "fingerprint": fingerprint(out),
                "cached": result.cached,
                "general_score": meta["general_score"],
                "scores": meta["scores"],
                "seconds": round(time.perf_counter() - started, 2),
            }
        )
    )
