"""Delta bundles (manifest formats 1 and 2): read (validating *everything*), digest; writing lives in :mod:`.writer`.

A bundle is a directory with ``delta.json`` (see :mod:`deltaserve.plugins.manifest`)
and the files it lists. :func:`read_bundle` treats the directory as untrusted: it
checks sizes with ``stat`` before reading, never imports or unpickles anything, and
raises one :class:`~deltaserve.plugins.errors.BundleError` listing every problem.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from deltaserve.plugins import file_checks, registry
from deltaserve.plugins.base_spec import BaseSpec
from deltaserve.plugins.errors import BundleError
from deltaserve.plugins.kind import DeltaKind
from deltaserve.plugins.manifest import (  # noqa: F401  (re-exported: the bundle API in one place)
    MANIFEST_FILE,
    BaseRef,
    Example,
    Manifest,
    MethodInfo,
    TaskInfo,
    parse_manifest,
)
from deltaserve.plugins.safetensors_header import read_header

if TYPE_CHECKING:
    import torch

_MiB, _GiB = 1 << 20, 1 << 30


@dataclass(frozen=True)
class Limits:
    """Size bounds applied (via ``stat``, before reading) when validating a bundle."""

    max_manifest_bytes: int = 1 * _MiB
    """Largest accepted ``delta.json`` — and any other ``.json`` file of the bundle."""
    max_file_bytes: int = 2 * _GiB
    """Largest accepted single file."""
    max_total_bytes: int = 4 * _GiB
    """Largest accepted sum of all file sizes."""
    max_files: int = 64
    """Most files and folders a bundle may contain (``delta.json`` included)."""


class Bundle:
    """A validated bundle directory. Construct with :func:`read_bundle`."""

    def __init__(self, path: Path, manifest: Manifest, kind: DeltaKind):
        self.path = path
        self.manifest = manifest
        self.kind = kind
        """Instance of the bundle's registered kind."""
        self.rejected: set[str] = set()
        """Files that failed the generic checks (type, size, parse): never read, not usable by kinds."""
        self._tensors: dict[str, dict[str, torch.Tensor]] = {}
        self._json: dict[str, object] = {}

    @property
    def name(self) -> str:
        return self.manifest.name

    def has_file(self, relpath: str) -> bool:
        """True when ``relpath`` is a regular file of the bundle (listed or not, usable or not)."""
        target = self.path / relpath
        return target.is_file() and not target.is_symlink()

    def usable(self, relpath: str) -> bool:
        """True when ``relpath`` exists and passed the generic checks (kinds may read it)."""
        return self.has_file(relpath) and relpath not in self.rejected

    def _require_usable(self, relpath: str) -> None:
        if relpath in self.rejected:
            raise BundleError(self.path, [f"file `{relpath}` failed validation and must not be read"])

    def load_tensors(self, relpath: str) -> dict[str, torch.Tensor]:
        """Tensors of a ``.safetensors`` file of the bundle (cached; safetensors never executes code)."""
        self._require_usable(relpath)
        if relpath not in self._tensors:
            from safetensors.torch import load_file

            self._tensors[relpath] = load_file(str(self.path / relpath))
        return self._tensors[relpath]

    def read_json(self, relpath: str) -> object:
        """Decoded JSON file of the bundle (cached)."""
        self._require_usable(relpath)
        if relpath not in self._json:
            self._json[relpath] = json.loads((self.path / relpath).read_text(encoding="utf-8"))
        return self._json[relpath]

    def __repr__(self) -> str:
        return f"Bundle({self.manifest.name!r}, kind={self.manifest.kind!r}, path={str(self.path)!r})"


def _read_manifest(path: Path, stats: dict, limits: Limits, problems: list[str]) -> Manifest | None:
    if MANIFEST_FILE not in stats:
        problems.append(f"missing manifest `{MANIFEST_FILE}`")
        return None
    if stats[MANIFEST_FILE].st_size > limits.max_manifest_bytes:
        problems.append(
            f"`{MANIFEST_FILE}` is {stats[MANIFEST_FILE].st_size} bytes, above the limit of {limits.max_manifest_bytes}"
        )
        return None
    try:
        obj = json.loads((path / MANIFEST_FILE).read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        problems.append(f"`{MANIFEST_FILE}` is not valid JSON: {exc}")
        return None
    manifest, manifest_problems = parse_manifest(obj)
    problems.extend(manifest_problems)
    return manifest


def _file_problems(
    bundle: Bundle, rel: str, size: int, expected_sha: str | None, limits: Limits
) -> tuple[list[str], bool]:
    """Type, size, magic bytes, sha256 and content of one file (read only within the limits).

    Returns (problems, usable): unusable files (wrong type, too big, unparsable) are
    never read again — the kind's validation sees them as rejected.
    """
    if bad := file_checks.type_problem(rel):
        return [bad], False
    limit = limits.max_manifest_bytes if file_checks.suffix(rel) == ".json" else limits.max_file_bytes
    if size > limit:
        return [f"file `{rel}` is {size} bytes, above the limit of {limit}"], False
    path = bundle.path / rel
    if bad := file_checks.magic_problem(rel, file_checks.read_head(path)):
        return [bad], False
    problems = []
    if expected_sha is not None and (actual := file_checks.sha256_file(path)) != expected_sha:
        problems.append(f"sha256 mismatch for `{rel}`: `files` says {expected_sha[:12]}…, the file is {actual[:12]}…")
    if bad := file_checks.text_problem(rel, path):
        return problems + [bad], False
    if file_checks.suffix(rel) == ".safetensors":
        try:
            read_header(path)  # bounded, plain JSON: before safetensors itself touches the file
            tensors = bundle.load_tensors(rel)
        except Exception as exc:  # HeaderError, or safetensors' own SafetensorError (an Exception)
            return problems + [f"`{rel}` is not a valid safetensors file: {exc}"], False
        for name, tensor in tensors.items():
            if tensor.is_floating_point() and not bool(tensor.isfinite().all()):
                problems.append(f"tensor `{name}` in `{rel}` contains NaN/Inf")
    return problems, True


def _check_listing(manifest: Manifest, on_disk: dict, problems: list[str]) -> None:
    for rel in sorted(set(manifest.files) - set(on_disk)):
        problems.append(f"file `{rel}` is listed in `files` but missing")
    for rel in sorted(set(on_disk) - set(manifest.files)):
        problems.append(f"extra file `{rel}` is not listed in `files`")
    for i, example in enumerate(manifest.task.examples):
        image = example.image
        if image and (image not in manifest.files or file_checks.suffix(image) not in file_checks.IMAGE_SUFFIXES):
            problems.append(f"`task.examples[{i}].image` `{image}` must be a PNG/JPEG listed in `files`")


def _kind_instance(manifest: Manifest | None, problems: list[str]) -> DeltaKind | None:
    if not (manifest and manifest.kind):
        return None
    try:
        return registry.get_kind(manifest.kind)()
    except Exception:  # KindRegistryError, or a kind class that fails to construct
        problems.append(registry.unknown_kind_message(manifest.kind))
        return None


def read_bundle(path: str | os.PathLike, base: BaseSpec | None = None, limits: Limits = Limits()) -> Bundle:
    """Validate the bundle at ``path`` (against ``base`` when given) and return it.

    Raises one :class:`BundleError` listing every problem: directory layout, manifest
    schema, unknown kind, file list vs disk, symlinks, unsafe paths, file types and
    magic bytes, sizes, sha256, safetensors headers, NaN/Inf, base fingerprint, then
    the kind's own :meth:`~deltaserve.plugins.kind.DeltaKind.validate`.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(path, [f"`{path}` is not a directory"])
    problems: list[str] = []
    stats = file_checks.walk(path, limits.max_files, problems)
    manifest = _read_manifest(path, stats, limits, problems)
    kind = _kind_instance(manifest, problems)
    on_disk = {rel: st for rel, st in stats.items() if rel != MANIFEST_FILE}
    if manifest is not None:  # without a manifest every file would be "extra": noise
        _check_listing(manifest, on_disk, problems)
    bundle = Bundle(path, manifest or Manifest(name="", kind="", base=BaseRef("", "")), kind)
    total = sum(st.st_size for st in stats.values())
    if total > limits.max_total_bytes:
        problems.append(f"bundle is {total} bytes in total, above the limit of {limits.max_total_bytes}")
        bundle.rejected.update(on_disk)  # nothing is read
    else:
        for rel, st in sorted(on_disk.items()):
            file_problems, usable = _file_problems(bundle, rel, st.st_size, bundle.manifest.files.get(rel), limits)
            problems += file_problems
            if not usable:
                bundle.rejected.add(rel)
    if manifest and base is not None and manifest.base.fingerprint and manifest.base.fingerprint != base.fingerprint:
        problems.append(
            f"base fingerprint mismatch: the bundle was tuned from `{manifest.base.name}` {manifest.base.fingerprint}, "
            f"the base is `{base.name}` {base.fingerprint}"
        )
    if kind is not None:
        try:
            problems.extend(kind.validate(bundle, base))
        except Exception as exc:  # a third-party kind's bug is still a rejected bundle, not a crash
            problems.append(f"kind `{manifest.kind}` failed to validate the bundle: {exc!r}")
    if problems:
        raise BundleError(path, problems)
    return bundle


def content_digest(bundle_path: str | os.PathLike) -> str:
    """``sha256:<hex>`` over the sorted (relative path, sha256) of every file, ``delta.json`` included.

    Hashes the files on disk (not the manifest's claims); the server compares digests to
    tell a re-registration with new content from an idempotent one.
    """
    root = Path(bundle_path)
    problems: list[str] = []
    stats = file_checks.walk(root, Limits().max_files, problems)
    if problems:
        raise BundleError(root, problems)
    h = hashlib.sha256(b"deltaserve-bundle-digest-v1\0")
    for rel in sorted(stats):
        h.update(f"{rel}\0{file_checks.sha256_file(root / rel)}\0".encode())
    return "sha256:" + h.hexdigest()


from deltaserve.plugins.writer import write_bundle  # noqa: E402,F401  (re-export; writer imports this module)
