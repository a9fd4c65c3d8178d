"""The bundle manifest ``delta.json``: dataclasses, schema check, JSON round trip.

Schema (format_version 1 or 2)::

    {"format_version": 2, "name": "<task>", "kind": "<kind>",
     "base": {"name": str, "fingerprint": "sha256:<hex>"},
     "task": {"description": str, "examples": [{"text": str, "image"?: "<relpath>"}], "metrics": {str: number}},
     "method": {"name": str, "hyperparameters": {...}},
     "files": {"<relpath>": "<sha256 hex>"},      # every file except delta.json
     "config": {...}}                              # kind-specific

Format 2 differs from 1 in the `sparse` kind's ``config`` alone: each parameter names the
``encoding`` of its differences (:mod:`deltaserve.plugins.sparse.encoding`; format 1 has int64
indices only). Writers stamp the oldest format that describes the bundle — 2 for `sparse`
bundles, 1 for the other kinds — so a reader of format 1 still reads everything it can, and
refuses a format 2 bundle with a clear message instead of misreading it.

:func:`parse_manifest` checks types and required fields and collects every problem;
file-system facts (files exist, hashes match) are checked by the bundle reader.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.kind_checks import is_number

FORMAT_VERSIONS = (1, 2)
"""Manifest formats this code reads."""
MANIFEST_FILE = "delta.json"
TASK_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
FINGERPRINT_RE = re.compile(r"sha256:[0-9a-f]{64}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
_TOP_LEVEL = ("format_version", "name", "kind", "base", "task", "method", "files", "config")


@dataclass(frozen=True)
class BaseRef:
    """The base a delta was tuned from."""

    name: str
    """Human-readable base name (informational)."""
    fingerprint: str
    """Content fingerprint of the base, ``sha256:<hex>``; must equal the serving base's."""


@dataclass(frozen=True)
class Example:
    """An example request of the task (the auto router matches requests against these)."""

    text: str
    """Prompt text."""
    image: str | None = None
    """Relative path of a PNG/JPEG inside the bundle, or None for a text-only example."""


@dataclass
class TaskInfo:
    """What the delta is for."""

    description: str = ""
    """Free-text description of the task."""
    examples: list[Example] = field(default_factory=list)
    """Example requests (text + optional image)."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Evaluation results, metric name → number."""


@dataclass
class MethodInfo:
    """How the delta was produced."""

    name: str = "unknown"
    """Tuning method (``spider``, ``magnitude``, ``full``, ``lora``, ``bottleneck``, ``import``, …)."""
    hyperparameters: dict = field(default_factory=dict)
    """Method hyper-parameters (JSON values)."""


@dataclass
class Manifest:
    """Parsed ``delta.json``."""

    name: str
    """Task name: ``[a-z0-9][a-z0-9._-]{0,63}`` without ``..`` (safe as a file and URL component)."""
    kind: str
    """Registered delta kind name."""
    base: BaseRef
    """Base model the delta was tuned from."""
    task: TaskInfo = field(default_factory=TaskInfo)
    """Task description, examples and metrics."""
    method: MethodInfo = field(default_factory=MethodInfo)
    """Tuning method and hyper-parameters."""
    files: dict[str, str] = field(default_factory=dict)
    """Relative path → sha256 hex of every bundle file except ``delta.json``."""
    config: dict = field(default_factory=dict)
    """Kind-specific configuration."""
    format_version: int = 1
    """Manifest format version: 1, or 2 when the bundle uses format 2's sparse encodings."""

    def to_dict(self) -> dict:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "kind": self.kind,
            "base": {"name": self.base.name, "fingerprint": self.base.fingerprint},
            "task": {
                "description": self.task.description,
                "examples": [{"text": e.text, **({"image": e.image} if e.image else {})} for e in self.task.examples],
                "metrics": dict(self.task.metrics),
            },
            "method": {"name": self.method.name, "hyperparameters": self.method.hyperparameters},
            "files": dict(sorted(self.files.items())),
            "config": self.config,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes, source: str = MANIFEST_FILE) -> Manifest:
        """Parse and schema-check; raises :class:`BundleError` listing every problem."""
        try:
            obj = json.loads(text)
        except ValueError as exc:
            raise BundleError(source, [f"`{MANIFEST_FILE}` is not valid JSON: {exc}"]) from None
        manifest, problems = parse_manifest(obj)
        if problems:
            raise BundleError(source, problems)
        return manifest


def task_name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid task name, or None."""
    if not isinstance(name, str) or not TASK_NAME_RE.fullmatch(name) or ".." in name:
        return f"`name` {name!r} is not a valid task name ([a-z0-9][a-z0-9._-]{{0,63}}, no `..`)"
    return None


MAX_PATH_CHARS = 512
MAX_PATH_COMPONENT_CHARS = 128
MAX_PATH_COMPONENT_BYTES = 255
"""UTF-8 bytes of one path component: the file systems' NAME_MAX (128 characters may be 512 bytes)."""
MAX_PATH_DEPTH = 8


def relpath_problem(path: object) -> str | None:
    """Why ``path`` is not a safe bundle-relative POSIX path, or None.

    Relative, normalised (no ``.``/``..``/empty components), no NUL or other control
    characters or unpaired surrogates, no backslash, at most :data:`MAX_PATH_DEPTH` components
    of at most :data:`MAX_PATH_COMPONENT_CHARS` characters (and :data:`MAX_PATH_COMPONENT_BYTES`
    bytes) and :data:`MAX_PATH_CHARS` in all.
    """
    if not isinstance(path, str) or not path:
        return f"path {path!r} is not a non-empty string"
    shown = ascii(path)[1:-1][:80]
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        return f"unsafe path `{shown}` (control characters)"
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return f"unsafe path `{shown}` (an unpaired UTF-16 surrogate)"
    if len(path) > MAX_PATH_CHARS:
        return f"path `{shown}…` is longer than {MAX_PATH_CHARS} characters"
    pure = PurePosixPath(path)
    if (
        pure.is_absolute()
        or "\\" in path
        or ".." in pure.parts
        or str(pure) != path
        or path.startswith("./")
        or pure.parts in ((), (".",))
    ):
        return f"unsafe path `{shown}` (must be relative, normalised, without `.` or `..`)"
    if len(pure.parts) > MAX_PATH_DEPTH or any(
        len(part) > MAX_PATH_COMPONENT_CHARS or len(part.encode()) > MAX_PATH_COMPONENT_BYTES for part in pure.parts
    ):
        return f"path `{shown}` is deeper than {MAX_PATH_DEPTH} levels or has a name longer than {MAX_PATH_COMPONENT_CHARS} characters ({MAX_PATH_COMPONENT_BYTES} bytes)"
    return None


def path_set_problems(paths: list[str]) -> list[str]:
    """Problems of a set of bundle paths as a whole: duplicates, and a path that is both a file and a folder."""
    problems = []
    seen = set()
    for rel in paths:
        if rel in seen:
            problems.append(f"`{rel}` is given twice")
        seen.add(rel)
    folders = {str(parent) for rel in seen for parent in PurePosixPath(rel).parents if str(parent) != "."}
    problems += [f"`{rel}` is both a file and a folder" for rel in sorted(seen & folders)]
    return problems


def _object(obj: dict, key: str, problems: list[str], where: str) -> dict | None:
    value = obj.get(key)
    if not isinstance(value, dict):
        problems.append(f"`{where}{key}` must be an object")
        return None
    return value


def _unexpected(obj: dict, allowed: tuple[str, ...], where: str, problems: list[str]) -> None:
    for key in sorted(set(obj) - set(allowed)):
        problems.append(f"unexpected field `{where}{key}`")


def _parse_task(task: dict, problems: list[str]) -> TaskInfo:
    _unexpected(task, ("description", "examples", "metrics"), "task.", problems)
    description = task.get("description", "")
    if not isinstance(description, str):
        problems.append("`task.description` must be a string")
        description = ""
    examples = []
    raw_examples = task.get("examples", [])
    if not isinstance(raw_examples, list):
        problems.append("`task.examples` must be a list")
        raw_examples = []
    for i, ex in enumerate(raw_examples):
        where = f"task.examples[{i}]"
        if not isinstance(ex, dict) or not isinstance(ex.get("text"), str):
            problems.append(f"`{where}` must be an object with a string `text`")
            continue
        _unexpected(ex, ("text", "image"), where + ".", problems)
        image = ex.get("image")
        if image is not None and (bad := relpath_problem(image)):
            problems.append(f"`{where}.image`: {bad}")
            image = None
        examples.append(Example(text=ex["text"], image=image))
    metrics = task.get("metrics", {})
    if not isinstance(metrics, dict) or not all(isinstance(k, str) and is_number(v) for k, v in metrics.items()):
        problems.append("`task.metrics` must be an object of finite numbers")
        metrics = {}
    return TaskInfo(description=description, examples=examples, metrics=dict(metrics))


def _parse_method(method: dict, problems: list[str]) -> MethodInfo:
    _unexpected(method, ("name", "hyperparameters"), "method.", problems)
    name, hyper = method.get("name"), method.get("hyperparameters", {})
    if not isinstance(name, str) or not name:
        problems.append("`method.name` must be a non-empty string")
        name = "unknown"
    if not isinstance(hyper, dict):
        problems.append("`method.hyperparameters` must be an object")
        hyper = {}
    return MethodInfo(name=name, hyperparameters=hyper)


def _parse_files(files: dict, problems: list[str]) -> dict[str, str]:
    good = {}
    for path, digest in files.items():
        if bad := relpath_problem(path):
            problems.append(f"`files`: {bad}")
        elif path == MANIFEST_FILE:
            problems.append(f"`files` must not list `{MANIFEST_FILE}` itself")
        elif not isinstance(digest, str) or not SHA256_RE.fullmatch(digest):
            problems.append(f"`files.{path}` must be a lowercase sha256 hex digest")
        else:
            good[path] = digest
    return good


def parse_manifest(obj: object) -> tuple[Manifest | None, list[str]]:
    """Schema-check a decoded ``delta.json``. Returns (manifest, every problem found).

    The manifest is None only when ``obj`` is not a JSON object.
    """
    if not isinstance(obj, dict):
        return None, [f"`{MANIFEST_FILE}` must be a JSON object"]
    problems: list[str] = []
    _unexpected(obj, _TOP_LEVEL, "", problems)
    version = obj.get("format_version")
    if type(version) is not int or version not in FORMAT_VERSIONS:
        problems.append(f"`format_version` must be {' or '.join(map(str, FORMAT_VERSIONS))}, got {version!r}")
        version = max(FORMAT_VERSIONS)
    if bad := task_name_problem(obj.get("name")):
        problems.append(bad)
    if not isinstance(obj.get("kind"), str) or not obj.get("kind"):
        problems.append("`kind` must be a non-empty string")
    base = _object(obj, "base", problems, "")
    if base is not None:
        _unexpected(base, ("name", "fingerprint"), "base.", problems)
        if not isinstance(base.get("name"), str):
            problems.append("`base.name` must be a string")
        if not isinstance(base.get("fingerprint"), str) or not FINGERPRINT_RE.fullmatch(base["fingerprint"]):
            problems.append("`base.fingerprint` must look like `sha256:<64 hex digits>`")
    task = _object(obj, "task", problems, "")
    method = _object(obj, "method", problems, "")
    files = _object(obj, "files", problems, "")
    config = _object(obj, "config", problems, "")
    task_info = _parse_task(task, problems) if task is not None else TaskInfo()
    method_info = _parse_method(method, problems) if method is not None else MethodInfo()
    good_files = _parse_files(files, problems) if files is not None else {}
    # Best effort even when broken: the bundle reader still checks files and hashes, so one
    # round reports every problem. Callers must not use a manifest that came with problems.
    base = base or {}
    manifest = Manifest(
        name=obj.get("name") if isinstance(obj.get("name"), str) else "",
        kind=obj.get("kind") if isinstance(obj.get("kind"), str) else "",
        base=BaseRef(name=str(base.get("name", "")), fingerprint=str(base.get("fingerprint", ""))),
        task=task_info,
        method=method_info,
        files=good_files,
        config=config if config is not None else {},
        format_version=version,
    )
    return manifest, problems
