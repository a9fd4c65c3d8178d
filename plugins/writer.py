"""Write a delta bundle atomically (temp sibling directory, validate, ``os.replace``).

Kind modules offer typed writers on top (``write_sparse_bundle``, …); this one is
kind-agnostic: it serialises the files, records their sha256 in ``files`` and writes
``delta.json`` last.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.manifest import (
    MANIFEST_FILE,
    BaseRef,
    Manifest,
    MethodInfo,
    TaskInfo,
    relpath_problem,
    task_name_problem,
)

if TYPE_CHECKING:
    from deltaserve.plugins.base_spec import BaseSpec

FileContent = bytes | Mapping[str, Any]  # raw bytes, or {tensor name: torch.Tensor} for a .safetensors file


def _serialise(rel: str, content: FileContent) -> bytes:
    if isinstance(content, (bytes, bytearray)):
        return bytes(content)
    if not rel.endswith(".safetensors"):
        raise ValueError(f"tensors can only be written to a .safetensors file, not `{rel}`")
    from safetensors.torch import save

    # contiguous + sorted: same tensors, same bytes (content digests stay stable)
    tensors = {k: v.detach().contiguous() for k, v in sorted(content.items())}
    return save(tensors, metadata={"format": "pt"})


def _write_synced(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished temp directory to ``out`` (an empty ``out`` is replaced by rename)."""
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
        old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(out, old)  # two renames: readers see the old or the new bundle, never a mix
        os.replace(tmp, out)
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        os.replace(tmp, out)


def write_bundle(
    out_dir: str | os.PathLike,
    *,
    name: str,
    kind: str,
    base: BaseSpec | BaseRef,
    config: dict,
    files: Mapping[str, FileContent],
    task: TaskInfo | None = None,
    method: MethodInfo | None = None,
    overwrite: bool = False,
    validate: bool = True,
    format_version: int = 1,
) -> Path:
    """Write a bundle to ``out_dir`` and return its path.

    ``files`` maps bundle-relative paths to bytes or to a ``{name: tensor}`` dict (written
    as safetensors). With ``validate`` (default) the finished bundle is checked with
    :func:`~deltaserve.plugins.bundle.read_bundle` (against ``base`` when it is a
    :class:`BaseSpec`) *before* it is published, so a writer never leaves an invalid
    bundle behind; the :class:`BundleError` then names ``out_dir``.
    Refuses to replace an existing non-empty ``out_dir`` unless ``overwrite``.
    ``format_version``: the oldest manifest format that describes the files (see
    :mod:`deltaserve.plugins.manifest`).
    """
    out = Path(out_dir)
    problems = [p for p in [task_name_problem(name)] if p]
    problems += [f"`files`: {bad}" for rel in files if (bad := relpath_problem(rel))]
    problems += [f"`files` must not contain `{MANIFEST_FILE}`" for rel in files if rel == MANIFEST_FILE]
    if problems:
        raise BundleError(out, problems)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} exists and is not empty (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        digests = {}
        for rel, content in sorted(files.items()):
            data = _serialise(rel, content)
            _write_synced(tmp / rel, data)
            digests[rel] = hashlib.sha256(data).hexdigest()
        manifest = Manifest(
            name=name,
            kind=kind,
            base=BaseRef(name=base.name, fingerprint=base.fingerprint),
            task=task or TaskInfo(),
            method=method or MethodInfo(),
            files=digests,
            config=config,
            format_version=format_version,
        )
        _write_synced(tmp / MANIFEST_FILE, manifest.to_json().encode())
        if validate:
            from deltaserve.plugins.base_spec import BaseSpec
            from deltaserve.plugins.bundle import read_bundle

            try:
                read_bundle(tmp, base=base if isinstance(base, BaseSpec) else None)
            except BundleError as exc:
                raise BundleError(out, exc.problems) from None
        _publish(tmp, out, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
