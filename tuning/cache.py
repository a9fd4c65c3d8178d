"""Content hashes and atomic directory writes, for everything tuning caches under ``cache_dir()``."""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType


def stable_hash(obj) -> str:
    """SHA-256 (hex) of a JSON-able object, independent of dict order."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def source_hash(modules: Iterable[ModuleType]) -> str:
    """SHA-256 over the source files of ``modules`` (by module name): code changes invalidate caches."""
    h = hashlib.sha256()
    for module in sorted(modules, key=lambda m: m.__name__):
        h.update(module.__name__.encode() + b"\0" + Path(inspect.getfile(module)).read_bytes() + b"\0")
    return h.hexdigest()


def tree_hash(root: Path) -> str:
    """SHA-256 over every file under ``root`` (relative path and bytes, in path order)."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        h.update(path.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


@contextmanager
def atomic_dir(final: Path, exist_ok: bool = False) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; rename it to ``final`` when the block succeeds.

    On error the temporary directory is removed and ``final`` is untouched. An existing empty
    ``final`` is replaced; an existing non-empty one is an error, unless ``exist_ok`` (a cache
    entry another process finished first: ours is discarded, theirs is identical by key).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        if final.is_dir() and not any(final.iterdir()):
            final.rmdir()
        try:
            os.rename(tmp, final)
        except OSError:
            if not (exist_ok and final.is_dir()):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def copy_dir(src: Path, out: Path) -> Path:
    """Copy the directory ``src`` to ``out`` (which must not exist or be empty), atomically."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} exists and is not an empty directory")
    with atomic_dir(out) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return out
