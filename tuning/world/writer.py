"""Write one task directory in the data format of :mod:`deltaserve.tuning.data`."""

from __future__ import annotations

import json
from pathlib import Path

from deltaserve.tuning.world.spec import SPLITS, RawSample, TaskSpec

EXAMPLE_PROMPTS = 8


def write_task(task_dir: Path, spec: TaskSpec, samples: dict[str, list[RawSample]]) -> Path:
    """Write ``task.json``, ``{train,val,test}.jsonl`` and ``images/`` into ``task_dir`` (created)."""
    (task_dir / "images").mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = []
        for i, sample in enumerate(samples[split]):
            image = None
            if sample.image is not None:
                image = f"images/{split}-{i:05d}.png"
                sample.image.save(task_dir / image, format="PNG")
            record = {
                "id": f"{spec.name}-{split}-{i:05d}",
                "prompt": sample.prompt,
                "target": sample.target,
                "image": image,
            }
            lines.append(json.dumps(record, ensure_ascii=False))
        (task_dir / f"{split}.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    info = {
        "name": spec.name,
        "description": spec.description,
        "type": spec.type,
        "metric": spec.metric,
        "example_prompts": _example_prompts(samples["train"]),
    }
    (task_dir / "task.json").write_text(json.dumps(info, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return task_dir


def _example_prompts(train: list[RawSample]) -> list[str]:
    seen: list[str] = []
    for sample in train:
        if sample.prompt not in seen:
            seen.append(sample.prompt)
        if len(seen) == EXAMPLE_PROMPTS:
            break
    return seen
