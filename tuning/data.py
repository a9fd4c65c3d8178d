"""Task data: the on-disk format of every task, built-in or brought by a user, and its validating loader.

A task is a directory::

    <task>/
      task.json      {"name": "digits",
                      "description": "Read a handwritten digit ...",
                      "type": "downstream",                 # or "general" (open-world tasks of the base)
                      "metric": "exact_match",                # or "token_f1"
                      "example_prompts": ["Which digit is written here?", ...]}   # used by the router
      train.jsonl    one JSON object per line (UTF-8):
      val.jsonl        {"id": "digits-train-00000", "prompt": "Which digit is written here?",
      test.jsonl        "target": "7", "image": "images/train-00000.png"}
      images/        the image files (any format and size PIL reads; the base's processor resizes)

Sample fields:

- ``id`` — non-empty string, unique within its file;
- ``prompt`` — the question, a non-empty string; it must not contain ``<image>`` (the
  image placeholder is added by the prompt format, see below);
- ``target`` — the expected answer, a non-empty string (short answers evaluate fast);
- ``image`` — a path relative to the task directory (``"images/x.png"``), or ``null``
  / absent for a text-only sample. Paths may not be absolute or leave the task directory.

Other keys are ignored; blank lines are skipped. The model sees the base's chat template
rendering a one-turn chat of the image and the prompt, and learns the answer turn the template
renders for ``target`` (:mod:`deltaserve.tuning.batching`): for the tiny LLaVA base
``"<s><image>\\nWhich digit is written here?\\nAnswer:"`` then ``" " + target + "</s>"``, for the
tiny Qwen2-VL base Qwen's chat layout then ``target + "<|im_end|>"``.

Validation reads every line and every image and reports all problems at once as one
:class:`~deltaserve.tuning.errors.DataError` whose message names file and line:
malformed JSON, a line that is not an object, missing or non-string fields, empty
target, duplicate id, missing or unreadable image, bad ``task.json``.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from deltaserve.tuning.errors import DataError, DataProblem

SPLITS = ("train", "val", "test")
TASK_TYPES = ("general", "downstream")
METRICS = ("exact_match", "token_f1")
"""Scores of :mod:`deltaserve.tuning.evaluate`: normalised exact match, or bag-of-words token F1 (partial credit)."""
TASK_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class Sample:
    """One validated sample; ``image`` is an absolute path or None."""

    id: str
    prompt: str
    target: str
    image: Path | None
    task: str

    def load_image(self) -> Image.Image:
        return open_rgb(self.image)


@dataclass(frozen=True)
class TaskInfo:
    """The validated ``task.json`` of a task directory."""

    name: str
    description: str
    type: str
    metric: str
    example_prompts: tuple[str, ...]
    path: Path


@dataclass(frozen=True)
class Task:
    info: TaskInfo
    splits: dict[str, list[Sample]]
    """Only the splits that were loaded."""

    @property
    def name(self) -> str:
        return self.info.name

    def __getitem__(self, split: str) -> list[Sample]:
        return self.splits[split]


def open_rgb(path: Path) -> Image.Image:
    """Decode an image fully (so truncated files fail here) as RGB."""
    with Image.open(path) as image:
        image.load()
        return image.convert("RGB")


def read_task_info(task_dir: str | Path) -> TaskInfo:
    task_dir = Path(task_dir)
    path = task_dir / "task.json"
    problems: list[DataProblem] = []

    def bad(message: str) -> None:
        problems.append(DataProblem(path, None, message))

    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError([DataProblem(path, None, "missing (every task directory needs a task.json)")]) from None
    except (OSError, UnicodeDecodeError) as e:
        raise DataError([DataProblem(path, None, f"unreadable: {e}")]) from None
    except json.JSONDecodeError as e:
        raise DataError([DataProblem(path, e.lineno, f"malformed JSON: {e.msg} (column {e.colno})")]) from None
    if not isinstance(raw, dict):
        raise DataError([DataProblem(path, None, f"expected a JSON object, got {type(raw).__name__}")])
    name = raw.get("name")
    if not isinstance(name, str) or not TASK_NAME.fullmatch(name):
        bad(f"`name` must match {TASK_NAME.pattern}, got {name!r}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        bad("`description` must be a string")
    kind = raw.get("type")
    if kind not in TASK_TYPES:
        bad(f"`type` must be one of {', '.join(TASK_TYPES)}, got {kind!r}")
    metric = raw.get("metric", "exact_match")
    if metric not in METRICS:
        bad(f"`metric` must be one of {', '.join(METRICS)}, got {metric!r}")
    examples = raw.get("example_prompts", [])
    if not isinstance(examples, list) or not all(isinstance(p, str) and p.strip() for p in examples):
        bad("`example_prompts` must be a list of non-empty strings")
    if problems:
        raise DataError(problems)
    return TaskInfo(name, description, kind, metric, tuple(examples), task_dir.resolve())


def read_split(task_dir: str | Path, split: str, task_name: str = "", check_images: bool = True) -> list[Sample]:
    """Read and validate ``<task_dir>/<split>.jsonl``; raises :class:`DataError` listing every bad line."""
    task_dir = Path(task_dir).resolve()
    path = task_dir / f"{split}.jsonl"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise DataError([DataProblem(path, None, f"missing (the `{split}` split)")]) from None
    except OSError as e:
        raise DataError([DataProblem(path, None, f"unreadable: {e}")]) from None
    problems: list[DataProblem] = []
    samples: list[Sample] = []
    seen: dict[str, int] = {}
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        sample, line_problems = _parse_line(raw_line, task_dir, task_name, check_images)
        problems += [DataProblem(path, number, m) for m in line_problems]
        if sample is None:
            continue
        if sample.id in seen:
            problems.append(
                DataProblem(path, number, f"duplicate `id` {sample.id!r} (first on line {seen[sample.id]})")
            )
            continue
        seen[sample.id] = number
        samples.append(sample)
    if not samples and not problems:
        problems.append(DataProblem(path, None, "no samples"))
    if problems:
        raise DataError(problems)
    return samples


def _parse_line(raw_line: bytes, task_dir: Path, task_name: str, check_images: bool) -> tuple[Sample | None, list[str]]:
    try:
        record = json.loads(raw_line.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, [f"not UTF-8: {e.reason} at byte {e.start}"]
    except json.JSONDecodeError as e:
        return None, [f"malformed JSON: {e.msg} (column {e.colno})"]
    if not isinstance(record, dict):
        return None, [f"expected a JSON object, got {type(record).__name__}"]
    problems = []
    for field in ("id", "prompt", "target"):
        value = record.get(field)
        if field not in record:
            problems.append(f"missing field `{field}`")
        elif not isinstance(value, str):
            problems.append(f"`{field}` must be a string, got {type(value).__name__}")
        elif not value.strip():
            problems.append(f"empty `{field}`")
    prompt = record.get("prompt")
    if isinstance(prompt, str) and IMAGE_PLACEHOLDER in prompt:
        problems.append(f"`prompt` contains the reserved placeholder `{IMAGE_PLACEHOLDER}` (give the image in `image`)")
    image, image_problem = _resolve_image(record.get("image"), task_dir, check_images)
    if image_problem:
        problems.append(image_problem)
    if problems:
        return None, problems
    return Sample(record["id"], record["prompt"], record["target"], image, task_name), []


def _resolve_image(value, task_dir: Path, check: bool) -> tuple[Path | None, str | None]:
    if value is None:
        return None, None
    if not isinstance(value, str) or not value.strip():
        return None, "`image` must be a relative path string or null"
    relative = Path(value)
    if relative.is_absolute() or ".." in relative.parts:
        return None, f"`image` {value!r} must be relative to the task directory and stay inside it"
    path = task_dir / relative
    if not path.is_file():
        return None, f"image file not found: {value!r}"
    if check:
        try:
            open_rgb(path)
        except Exception as e:  # PIL raises many types for bad files
            return None, f"unreadable image {value!r}: {e}"
    return path, None


def load_task(task_dir: str | Path, splits: tuple[str, ...] = SPLITS, check_images: bool = True) -> Task:
    """Validate ``task.json`` and the requested splits of one task directory."""
    info = read_task_info(task_dir)
    problems: list[DataProblem] = []
    loaded: dict[str, list[Sample]] = {}
    for split in splits:
        try:
            loaded[split] = read_split(task_dir, split, info.name, check_images)
        except DataError as e:
            problems += e.problems
    if problems:
        raise DataError(problems)
    return Task(info, loaded)


def load_tasks(
    root: str | Path, type: str | None = None, names: tuple[str, ...] | None = None, splits: tuple[str, ...] = SPLITS
) -> dict[str, Task]:
    """Every task directory directly under ``root`` (optionally only one ``type`` or the named ones), by name."""
    root = Path(root)
    tasks: dict[str, Task] = {}
    for task_dir in sorted(p.parent for p in root.glob("*/task.json")):
        info = read_task_info(task_dir)
        if (type is not None and info.type != type) or (names is not None and info.name not in names):
            continue
        if info.name in tasks:
            raise DataError(
                [
                    DataProblem(
                        task_dir / "task.json",
                        None,
                        f"task name `{info.name}` also used by {tasks[info.name].info.path}",
                    )
                ]
            )
        tasks[info.name] = load_task(task_dir, splits)
    missing = set(names or ()) - set(tasks)
    if missing:
        raise DataError([DataProblem(root, None, f"no task named {', '.join(f'`{n}`' for n in sorted(missing))}")])
    return tasks


def pick_examples(samples: list[Sample], n: int, seed: int) -> list[Sample]:
    """``n`` training samples, seeded, round-robin over distinct prompts (every phrasing is represented)."""
    order = list(samples)
    random.Random(f"deltaserve-examples\0{seed}").shuffle(order)
    groups: dict[str, list[Sample]] = {}
    for s in order:
        groups.setdefault(s.prompt, []).append(s)
    picked: list[Sample] = []
    while len(picked) < min(n, len(order)):
        for prompt in list(groups):
            if groups[prompt] and len(picked) < n:
                picked.append(groups[prompt].pop(0))
    return picked
