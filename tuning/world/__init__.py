"""The synthetic but honest multimodal world the embedded base is pretrained and tuned on.

Deterministic: the same :class:`WorldConfig` writes byte-identical files.

- general tasks (pretraining, "open world"): ``caption``, ``colour``, ``count``,
  ``position`` over rendered scenes (:mod:`.scenes`, :mod:`.render`), and the text-only
  ``arithmetic`` and ``opposites``;
- downstream tasks the base never sees: ``digits`` (scikit-learn's real handwritten
  digits) and ``relations`` (a new skill over the synthetic scenes).

Every task is asked in about two dozen phrasings (short and long, a few in other
languages), and the splits are disjoint by phrasing as well as by content: validation
and test prompts are worded in ways no training sample is (:func:`.spec.phrasings_of`),
so both the experts and the router are measured on wordings they never saw.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from deltaserve.plugins import env
from deltaserve.tuning.cache import atomic_dir, source_hash, stable_hash
from deltaserve.tuning.world import digits, general, relations, render, scene_tasks, scenes, spec, text, writer
from deltaserve.tuning.world.spec import SPLITS, TaskSpec
from deltaserve.tuning.world.writer import write_task

WORLD_VERSION = 3
"""Bump whenever generated content changes: it is part of every cache key built on the world."""

TASKS: tuple[TaskSpec, ...] = (*general.TASKS, *text.TASKS, digits.TASK, relations.TASK)
GENERAL_TASKS = tuple(t.name for t in TASKS if t.type == "general")
DOWNSTREAM_TASKS = tuple(t.name for t in TASKS if t.type == "downstream")


@dataclass(frozen=True)
class WorldConfig:
    """How much of the world to generate. Text tasks and ``digits`` are capped by their natural size."""

    seed: int = 0
    """Selects the scenes, renders, phrasings and the split assignment."""
    general_train: int = 3000
    """Training samples per general task."""
    downstream_train: int = 1500
    """Training samples per downstream task."""
    val: int = 100
    """Validation samples per task."""
    test: int = 200
    """Test samples per task."""


def build_world(out: Path, config: WorldConfig | None = None, tasks: tuple[str, ...] | None = None) -> dict[str, Path]:
    """Write the tasks (all, or the named ones) as ``out/<task>/``; returns name → task directory."""
    config = config or WorldConfig()
    out = Path(out)
    unknown = set(tasks or ()) - {t.name for t in TASKS}
    if unknown:
        raise ValueError(f"unknown world task(s): {', '.join(f'`{n}`' for n in sorted(unknown))}")
    written = {}
    for task in TASKS:
        if tasks is not None and task.name not in tasks:
            continue
        train = config.general_train if task.type == "general" else config.downstream_train
        sizes = {"train": train, "val": config.val, "test": config.test}
        samples = {split: task.generate(split, sizes[split], config.seed) for split in SPLITS}
        written[task.name] = write_task(out / task.name, task, samples)
    manifest = {"world_version": WORLD_VERSION, "config": asdict(config), "tasks": sorted(written)}
    (out / "world.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return written


def world_key(config: WorldConfig, tasks: tuple[str, ...] | None = None) -> str:
    """Content key of a generated world: version, config, task selection and the generator's code."""
    code = source_hash(
        [digits, general, relations, render, scene_tasks, scenes, spec, text, writer, sys.modules[__name__]]
    )
    return stable_hash(
        {
            "world_version": WORLD_VERSION,
            "config": asdict(config),
            "tasks": sorted(tasks) if tasks else None,
            "code": code,
        }
    )


def cached_world(config: WorldConfig | None = None, tasks: tuple[str, ...] | None = None) -> Path:
    """The world generated once under ``cache_dir()/worlds/<key>`` (written atomically); returns its directory."""
    config = config or WorldConfig()
    final = env.cache_dir() / "worlds" / world_key(config, tasks)[:32]
    if not (final / "world.json").is_file():
        with atomic_dir(final, exist_ok=True) as tmp:
            build_world(tmp, config, tasks)
    return final


__all__ = [
    "DOWNSTREAM_TASKS",
    "GENERAL_TASKS",
    "TASKS",
    "WORLD_VERSION",
    "WorldConfig",
    "build_world",
    "cached_world",
    "world_key",
]
